"""Index benchmark: encoding throughput, ANN recall, size, build time, sharded vs unsharded search.

    .venv/bin/python benchmarks/index.py                       # full size (1M x 768-d vectors)
    .venv/bin/python benchmarks/index.py --n 100000 --encode-passages 400 --queries 200   # quick

Prints one markdown table; every row has a same-run baseline:
- encoding: the Ray Data pipeline (1 actor, 1 CPU, 1 torch thread) vs a plain single-process loop
  over the same model, batch size and thread count (target >= 0.9x);
- recall@10 / @100 of IVF-PQ and HNSW against exact search (faiss.knn) on clustered + random
  768-d unit vectors, with build time and index bytes per passage;
- QPS (batched) and p50/p99 single-query latency of ShardedIndex over 4 shards vs 1 shard of the
  same IVF-PQ index (shared trained quantizer, so results are identical; passages fetched in both;
  target <= 1.2x latency).
"""

from __future__ import annotations

import argparse
import os

# The benchmark machine is shared: OpenMP threads that spin while waiting for a descheduled peer
# made FAISS training 4-7x slower there. Passive waiting must be chosen before OpenMP loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from _common import make_vectors  # noqa: E402

from raggen.index import shard as S  # noqa: E402
from raggen.index.manifest import EncoderInfo, Manifest, ShardEntry  # noqa: E402
from raggen.index.passage_table import passages_table  # noqa: E402
from raggen.index.search_params import SearchParams  # noqa: E402
from raggen.index.shard_searcher import ShardSearcher, _LocalBackend  # noqa: E402
from raggen.index.sharded import ShardedIndex  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    import ray
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, load avg {load:.1f} at start; "
            f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads), torch {torch.__version__}, "
            f"ray {ray.__version__}, python {platform.python_version()}")  # fmt: skip


# ------------------------------------------------------------------------------------------ encoding


def bench_encoding(num_passages: int, batch_size: int, max_length: int, work: Path, rounds: int = 2) -> list[tuple]:
    """Interleaved rounds (plain, Ray on n/2, Ray on n), best of each (the shared machine's load
    drifts). Steady state: the plain loop's encode time without model load vs Ray's marginal rate
    (n/2) / (t(n) - t(n/2)), which cancels actor start-up and model load."""
    import pandas as pd
    import ray
    import torch

    from raggen.corpus.world import WorldConfig, write_world
    from raggen.index.build_settings import IndexBuildSettings
    from raggen.index.encode import encode_passages
    from raggen.index.shard_split import split_by_shard
    from raggen.index.work_dir import check_run_signature, lock_work_dir, run_signature
    from raggen.models.retriever import EncoderSpec, TextEncoder, passage_text

    files = write_world(work / "world", WorldConfig(num_entities=max(10, num_passages // 2), seed=0))
    df = pd.read_csv(files.passages_v1, sep="\t", dtype=str, keep_default_na=False).head(num_passages)
    n, half = len(df), len(df) // 2
    torch.set_num_threads(1)

    def plain() -> tuple[float, float]:
        t0 = time.perf_counter()
        encoder = TextEncoder.from_pretrained(MINILM, pooling="mean", max_length=max_length)
        texts = [passage_text(t, x) for t, x in zip(df["title"], df["text"])]
        t1 = time.perf_counter()
        encoder.encode(texts, batch_size=batch_size)
        t2 = time.perf_counter()
        return n / (t2 - t0), n / (t2 - t1)

    kwargs = dict(encoder=EncoderSpec(name_or_path=MINILM, max_length=max_length), torch_threads=1,
                  settings=IndexBuildSettings(batch_size=batch_size, num_shards=1, num_actors=1, actor_num_cpus=1.0,
                                              actor_num_gpus=None))  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    plain_runs, ray_runs = [], {half: [], n: []}
    try:
        split_s = 0.0
        for size in (half, n):
            df.head(size).to_csv(work / f"passages{size}.tsv", sep="\t", index=False)
            info, _lock = lock_work_dir(work / f"enc{size}")  # held for the run (released at exit)
            check_run_signature(work / f"enc{size}", run_signature(str(work / f"passages{size}.tsv"),
                                encoder_name_or_path=MINILM, max_length=max_length))  # fmt: skip
            ts = time.perf_counter()
            split_by_shard(
                str(work / f"passages{size}.tsv"),
                work / f"enc{size}",
                format="auto",
                num_shards=1,
                s3_options=None,
                work_id=info["id"],
            )
            split_s = time.perf_counter() - ts
        for _ in range(rounds):
            plain_runs.append(plain())
            for size in (half, n):
                shutil.rmtree(work / f"enc{size}" / "encoded", ignore_errors=True)  # keep the split, redo the encoding
                t3 = time.perf_counter()
                encode_passages(str(work / f"passages{size}.tsv"), work / f"enc{size}", **kwargs)
                ray_runs[size].append(time.perf_counter() - t3)
    finally:
        ray.shutdown()
    t_half, t_full = min(ray_runs[half]), min(ray_runs[n])
    ray_total, ray_steady = n / t_full, (n - half) / max(t_full - t_half, 1e-9)
    plain_total, plain_steady = max(r[0] for r in plain_runs), max(r[1] for r in plain_runs)
    what = f"encode passages/s (MiniLM, batch {batch_size}, len {max_length}, 1 worker, 1 thread; best of {rounds})"
    return [
        (
            what + ": steady state",
            f"{ray_steady:.1f} (Ray Data, marginal)",
            f"{plain_steady:.1f} (plain loop)",
            ray_steady / plain_steady,
            ">= 0.9",
        ),
        (
            f"  end to end for {n} passages, incl. model load + actor start",
            f"{ray_total:.1f}",
            f"{plain_total:.1f}",
            ray_total / plain_total,
            "",
        ),
        (
            "  Ray Data runs, s: n/2 | n",
            " ".join(f"{t:.1f}" for t in ray_runs[half]) + " | " + " ".join(f"{t:.1f}" for t in ray_runs[n]),
            "",
            None,
            "",
        ),
        (
            f"  Ray Data split stage for {n} passages (read + shard + write parquet), s",
            f"{split_s:.1f}",
            "",
            None,
            "once per run",
        ),
    ]


# ------------------------------------------------------------------------------------------ vectors


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """k-recall@k: |found top-k ∩ true top-k| / k, averaged over queries."""
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth)]))


def bench_ann(
    xb, xq, gt, factory, params: list[dict], train_sample: int, hnsw_n: int | None = None
) -> tuple[list[tuple], faiss.Index]:
    n = len(xb) if hnsw_n is None else hnsw_n
    t0 = time.perf_counter()
    index = S.build_shard_index(xb[:n], np.arange(n), factory=factory, metric="ip", train_sample=train_sample)
    build = time.perf_counter() - t0
    size = len(S.serialize_index(index))
    rows = [(f"{factory}: build s / index bytes per passage (n={n:,})", f"{build:.1f} s / {size / n:.1f} B",
             f"Flat: {xb.shape[1] * 4} B", None, "")]  # fmt: skip
    truth = gt if hnsw_n is None else _exact(xb[:n], xq, gt.shape[1])
    for p in params:
        S.set_search_params(index, **p)
        t0 = time.perf_counter()
        _, I = S.search(index, xq, truth.shape[1])
        dt = time.perf_counter() - t0
        label = ", ".join(f"{k}={v}" for k, v in p.items())
        rows.append((f"{factory} ({label}): recall@10 / @100, QPS", f"{recall_at(I, truth, 10):.3f} / {recall_at(I, truth, 100):.3f}, {len(xq) / dt:.0f}",
                     "1.000 / 1.000 (exact)", None, ""))  # fmt: skip
        if "PQ" in factory:  # what training sees: the top-100 re-scored with the stored (parquet) embeddings
            exact = np.einsum("qd,qkd->qk", xq, xb[np.maximum(I, 0)])  # (q, 100)
            reranked = np.take_along_axis(I, np.argsort(-exact, axis=1), 1)
            rows.append((f"  {factory} ({label}) top-100 re-scored with stored embeddings: recall@10",
                         f"{recall_at(reranked, truth, 10):.3f}", "1.000 (exact)", None, ""))  # fmt: skip
    return rows, index


def _exact(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    _, I = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    return I


# ------------------------------------------------------------------------------------------ sharded


def as_sharded(indexes: list[faiss.Index], n: int, d: int, nprobe: int, max_threads: int | None) -> ShardedIndex:
    """ShardedIndex over in-memory shard indexes holding rows [offset, offset + ntotal) of xb."""
    searchers, entries, offset = [], [], 0
    for s, index in enumerate(indexes):
        rows = np.arange(offset, offset + index.ntotal)
        offset += index.ntotal
        ids = (np.int64(s) << 40) + np.arange(len(rows), dtype=np.int64) if len(indexes) > 1 else rows.astype(np.int64)
        table = passages_table(ids, [f"p{r}" for r in rows], [""] * len(rows), [f"text {r}" for r in rows])
        searchers.append(
            ShardSearcher(S.serialize_index(index), table, metric="ip", params=SearchParams(nprobe=nprobe))
        )
        entries.append(ShardEntry(index=f"shard-{s:05d}.faiss", index_sha256="0" * 64, passages=f"shard-{s:05d}.parquet",
                                  passages_sha256="0" * 64, count=len(rows)))  # fmt: skip
    manifest = Manifest(version="bench", created="-", encoder=EncoderInfo(name_or_path="random", pooling="mean", dim=d),
                        metric="ip", faiss_factory="bench", num_passages=n, shards=entries)  # fmt: skip
    return ShardedIndex(_LocalBackend(searchers, max_workers=max_threads), manifest=manifest, dim=d)


def latency(index: ShardedIndex, xq: np.ndarray, k: int, batch: int) -> tuple[float, float, float]:
    single = []
    for q in xq[: min(len(xq), 300)]:
        t0 = time.perf_counter()
        index.search(q[None], k)
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, len(xq), batch):
        index.search(xq[i : i + batch], k)
    qps = len(xq) / (time.perf_counter() - t0)
    return qps, float(np.percentile(single, 50) * 1e3), float(np.percentile(single, 99) * 1e3)


def bench_sharded(xb, xq, gt, unsharded: faiss.Index, *, nprobe: int, shards: int, k: int = 10) -> list[tuple]:
    """1 IVF-PQ index vs ``shards`` shards sharing its trained quantizer + codebooks (what
    build_index does): each shard holds part of every inverted list, so probing the same nprobe
    lists in every shard scans exactly the codes the single index scans -> identical results."""
    n, d = xb.shape
    t0 = time.perf_counter()
    trained = S.deserialize_index(S.serialize_index(unsharded))
    trained.reset()  # the same trained quantizer + codebooks, no vectors
    parts = np.array_split(np.arange(n), shards)
    indexes = [S.build_shard_index(xb[p], (np.int64(s) << 40) + np.arange(len(p)), trained_index=trained)
               for s, p in enumerate(parts)]  # fmt: skip
    build = time.perf_counter() - t0
    one = as_sharded([unsharded], n, d, nprobe, None)
    rows = [
        (f"sharded build: {shards} shards from the shared trained index (adds only), s", f"{build:.1f}", "", None, "")
    ]
    ref = one.search(xq, k)
    base = np.array([[int(i[1:]) for i in row] for row in ref.ids])
    q1, p50_1, p99_1 = latency(one, xq, k, 64)
    for threads, label in ((None, "thread per core"), (1, "sequential")):
        many = as_sharded(indexes, n, d, nprobe, threads)
        res = many.search(xq, k)
        found = np.array([[int(i[1:]) for i in row] for row in res.ids])
        qn, p50_n, p99_n = latency(many, xq, k, 64)
        rows += [
            (f"ShardedIndex {shards} shards ({label}) vs 1 index, nprobe {nprobe}: QPS (batches of 64)", f"{qn:.0f}", f"{q1:.0f}", qn / q1, ""),
            ("  single-query latency p50 / p99, ms", f"{p50_n:.2f} / {p99_n:.2f}", f"{p50_1:.2f} / {p99_1:.2f}", p50_n / p50_1, "<= 1.2x (p50)"),
            ("  recall@10 vs exact; top-10 ids equal to the single index's", f"{recall_at(found, gt, 10):.3f}; {np.mean(found == base):.3f}",
             f"{recall_at(base, gt, 10):.3f}", None, ""),
        ]  # fmt: skip
        many.close()
    return rows


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors for the ANN part")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--ivf", default="IVF1024,PQ64")
    p.add_argument("--hnsw", default="HNSW32")
    p.add_argument(
        "--hnsw-n", type=int, default=None, help="vectors for HNSW (default --n; its build is the slow part)"
    )
    p.add_argument("--train-sample", type=int, default=65_536)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--encode-passages", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--skip-encode", action="store_true")
    p.add_argument("--skip-hnsw", action="store_true")
    args = p.parse_args(argv)

    print(f"machine: {machine()}\n", flush=True)
    rows: list[tuple] = []
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="raggen-bench-index-"))
    try:
        if not args.skip_encode:
            rows += bench_encoding(args.encode_passages, args.batch_size, args.max_length, work)
            print(f"[{time.perf_counter() - started:.0f}s] encoding done", flush=True)
        t0 = time.perf_counter()
        xb = make_vectors(args.n, args.d, seed=0)
        xq = make_vectors(args.queries, args.d, seed=1)
        gt = _exact(xb, xq, 100)
        rows.append(
            (
                f"exact search (faiss.knn) over {args.n:,} x {args.d}: data + ground truth, s",
                f"{time.perf_counter() - t0:.1f}",
                "",
                None,
                "",
            )
        )
        print(f"[{time.perf_counter() - started:.0f}s] data + ground truth done", flush=True)
        ivf_rows, ivf = bench_ann(xb, xq, gt, args.ivf, [{"nprobe": 16}, {"nprobe": 64}], args.train_sample)
        rows += ivf_rows
        print(f"[{time.perf_counter() - started:.0f}s] {args.ivf} done", flush=True)
        rows += bench_sharded(xb, xq, gt, ivf, nprobe=16, shards=args.shards)
        del ivf
        print(f"[{time.perf_counter() - started:.0f}s] sharded done", flush=True)
        if not args.skip_hnsw:
            hnsw_rows, hnsw = bench_ann(
                xb, xq, gt, args.hnsw, [{"ef_search": 64}, {"ef_search": 256}], args.train_sample, args.hnsw_n
            )
            rows += hnsw_rows
            del hnsw
            print(f"[{time.perf_counter() - started:.0f}s] {args.hnsw} done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print(rows, started)


def _print(rows: list[tuple], started: float) -> None:
    rows = rows + [("total benchmark wall time, s", f"{time.perf_counter() - started:.0f}", "", None, "")]
    print("\n| measurement | raggen | same-run baseline | ratio | target |\n|---|---|---|---|---|")
    for what, value, base, ratio, target in rows:
        print(f"| {what} | {value} | {base} | {'' if ratio is None else f'{ratio:.2f}x'} | {target} |")


if __name__ == "__main__":
    main()
