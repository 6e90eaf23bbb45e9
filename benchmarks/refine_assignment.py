"""Re-ranked shards of the 21M recipe's shape, searched with their IVF lists assigned once for all of
them against each shard searching its own coarse quantizer.

``configs/wiki-dpr-21m.yaml`` builds ``IVF65536,PQ64,Refine(SQfp16)`` in 8 shards that share one
trained quantizer (65,536 x 768 fp32, 201 MB, a copy in each shard file). FAISS's ``IndexRefine``
searches that quantizer in every shard, for every query; raggen assigns a query's lists once (in the
process that holds several shards, or in a shard actor's caller) and searches each shard over them
(``raggen.index.preassigned``: the base IVF over the given lists, then the refine codes). This
times single queries on one thread through raggen's in-process backend (``_LocalBackend``, as one
shard actor holding the shards runs them), both ways over the same shard objects, and checks that
both give the same top-k.

The shards are built without k-means (the clock is the point): the centroids are draws of the
seeded mixture of ``scale.py``, each passage is a centroid plus noise added to that centroid's list,
and PQ is trained on the raw vectors (``by_residual`` off) from a sample. Each shard holds
``--per-shard`` passages, far fewer than 21M / 8; at the recipe's size a probed list holds ~40 codes
per shard, a PQ64 scan of ~5k codes at nprobe 128, small beside the 201 MB quantizer search.

    .venv/bin/python benchmarks/refine_assignment.py [--shards 8] [--nlist 65536] [--per-shard 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine, make_vectors  # noqa: E402

from raggen.index import shard_searcher  # noqa: E402
from raggen.index.hits import merge_topk  # noqa: E402
from raggen.index.passage_table import passages_table  # noqa: E402
from raggen.index.search_params import SearchParams  # noqa: E402
from raggen.index.shard_searcher import ShardSearcher, _LocalBackend  # noqa: E402


def recipe_shard(centroids: np.ndarray, pq: faiss.IndexPQ, xb: np.ndarray, lists: np.ndarray, ids: np.ndarray):
    """IDMap2(IndexRefine(IVF-PQ over ``centroids``, SQfp16)) holding ``xb`` in the given ``lists``:
    the layout ``IVF..,PQ64,Refine(SQfp16)`` builds, filled without a quantizer search."""
    nlist, d = centroids.shape
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)  # its own copy, as every shard file holds one
    ivf = faiss.IndexIVFPQ(quantizer, d, nlist, pq.pq.M, pq.pq.nbits, faiss.METRIC_INNER_PRODUCT)
    ivf.own_fields = True
    quantizer.this.disown()
    ivf.by_residual = False
    ivf.pq = pq.pq  # trained on raw vectors
    ivf.is_trained = True
    refine_codes = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    refine = faiss.IndexRefine(ivf, refine_codes)
    refine.own_fields = True
    ivf.this.disown()
    refine_codes.this.disown()
    index = faiss.IndexIDMap2(refine)  # wraps them while empty (FAISS's rule), filled below
    index.own_fields = True
    refine.this.disown()
    ivf.add_core(len(xb), faiss.swig_ptr(xb), None, faiss.swig_ptr(np.ascontiguousarray(lists, dtype=np.int64)))
    refine_codes.add(xb)
    refine.ntotal = index.ntotal = len(xb)
    faiss.copy_array_to_vector(np.ascontiguousarray(ids, dtype=np.int64), index.id_map)
    index.construct_rev_map()
    return index


def per_query_ms(fn, xq: np.ndarray) -> tuple[float, np.ndarray]:
    """Median ms of fn(one query) over ``xq``, and the ids it returned (len(xq), k)."""
    fn(xq[:1])  # warm-up
    times, found = [], []
    for i in range(len(xq)):
        t0 = time.perf_counter()
        ids = fn(xq[i : i + 1])
        times.append(time.perf_counter() - t0)
        found.append(ids[0])
    return float(np.median(times) * 1e3), np.stack(found)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8, help="re-ranked shards in one process (the recipe: 8)")
    p.add_argument("--nlist", type=int, default=65536, help="IVF lists (configs/wiki-dpr-21m.yaml: 65536)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--per-shard", type=int, default=20_000, help="passages per shard")
    p.add_argument("--pq-m", type=int, default=64, help="PQ sub-quantizers (the recipe: PQ64)")
    p.add_argument("--nprobe", type=int, default=128)
    p.add_argument("--k-factor", type=float, default=4.0, help="refine_k_factor: k x this PQ candidates re-scored")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=100)
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)  # single queries on one thread: one shard actor's share of a query
    rng = np.random.default_rng(0)
    centroids = make_vectors(args.nlist, args.dim, seed=1)
    pq = faiss.IndexPQ(args.dim, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(make_vectors(min(20_000, args.per_shard * args.shards), args.dim, seed=3))
    searchers = []
    for s in range(args.shards):
        lists = rng.integers(0, args.nlist, args.per_shard)
        xb = centroids[lists] + 0.3 * rng.standard_normal((args.per_shard, args.dim), dtype=np.float32) / args.dim**0.5
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        ids = (np.int64(s) << 40) + np.arange(args.per_shard, dtype=np.int64)
        index = recipe_shard(centroids, pq, xb, lists, ids)
        blank = [""] * args.per_shard
        searchers.append(ShardSearcher(index, passages_table(ids, blank, blank, blank), metric="ip",
                                       params=SearchParams(nprobe=args.nprobe, refine_k_factor=args.k_factor)))  # fmt: skip
        print(f"shard {s + 1}/{args.shards} built", file=sys.stderr, flush=True)
    default = _LocalBackend(searchers, max_workers=1).coarse is not None  # raggen's own rule at this size
    shard_searcher.REFINE_ASSIGN_MIN_QUANTIZER_BYTES = 0  # measured at any size (the rule's basis)
    backend = _LocalBackend(searchers, max_workers=1)
    assert backend.coarse is not None, "the shards share one quantizer: assigned once"
    xq = make_vectors(args.queries, args.dim, seed=2)
    k = args.k

    def each_shard(q):  # FAISS's own IndexRefine.search in every shard (its quantizer each time)
        return merge_topk([s.search(q, k) for s in searchers], k)[1]

    def assigned_once(q):  # raggen's in-process backend: one quantizer search, then every shard
        return backend.topk(q, k)[1]

    def quantizer_only(q):
        return backend.coarse.assign(q, None)[1]

    base_ms, base_ids = per_query_ms(each_shard, xq)
    new_ms, new_ids = per_query_ms(assigned_once, xq)
    q_ms, _ = per_query_ms(quantizer_only, xq)
    same = float(np.mean([set(a) == set(b) for a, b in zip(base_ids.tolist(), new_ids.tolist())]))
    rows = [
        ["each shard searches its quantizer (FAISS IndexRefine.search)", f"{base_ms:.2f}", "1.00x", "-"],
        ["lists assigned once, then each shard (raggen)", f"{new_ms:.2f}", f"{new_ms / base_ms:.2f}x", f"{same:.3f}"],
        ["  of which: one search of the quantizer", f"{q_ms:.2f}", f"{q_ms / base_ms:.2f}x", ""],
    ]
    print(f"{args.shards} shards of IVF{args.nlist},PQ{args.pq_m},Refine(SQfp16) x {args.dim}-d, {args.per_shard:,} "
          f"passages each, nprobe {args.nprobe}, refine_k_factor {args.k_factor:g}, k={k}: {args.queries} single "
          f"queries on 1 thread; raggen assigns once at this quantizer size: {'yes' if default else 'no'} "
          f"(shard_searcher.REFINE_ASSIGN_MIN_QUANTIZER_BYTES)")  # fmt: skip
    print(f"machine: {machine()}")
    print(format_table(["search", "ms / query (p50)", "vs each shard", "same top-k"], rows))


if __name__ == "__main__":
    main()
