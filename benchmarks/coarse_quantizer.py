"""Coarse quantizer cost at the 21M recipe's nlist: a flat quantizer against an HNSW one.

``configs/wiki-dpr-21m.yaml`` builds ``IVF65536,PQ64,Refine(SQfp16)``: every query first searches the
65,536 centroids (768-d fp32, 201 MB) of each shard's coarse quantizer, on CPU once per re-ranked
shard (neither the in-process sharing nor a caller's copy applies to those shards). This prints,
for one query on one thread: the flat quantizer's search time (the baseline) and an HNSW32
quantizer's over the same centroids at a few efSearch values, with the share of the flat search's
top-nprobe lists the HNSW search finds (what an ``IVF65536_HNSW32,...`` index would probe).

Centroids and queries are draws of the seeded mixture of ``scale.py`` (real k-means centroids of DPR
embeddings would be clustered differently; the time is the point, the overlap is indicative).

    .venv/bin/python benchmarks/coarse_quantizer.py [--nlist 65536] [--dim 768] [--queries 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine, make_vectors  # noqa: E402


def per_query_ms(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """Median ms of single-query searches, and the ids found (len(xq), k)."""
    index.search(xq[:1], k)  # warm-up
    times, found = [], np.empty((len(xq), k), np.int64)
    for i in range(len(xq)):
        t0 = time.perf_counter()
        _, found[i : i + 1] = index.search(xq[i : i + 1], k)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), found


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-nprobe lists that ``found`` holds."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nlist", type=int, default=65536, help="centroids (configs/wiki-dpr-21m.yaml: 65536)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--nprobe", type=int, default=128, help="lists each query probes (the overlap's k)")
    p.add_argument("--ef-search", type=int, action="append", default=None, help="HNSW efSearch (repeatable)")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)  # one query on one thread: what a shard actor's single query costs
    centroids = make_vectors(args.nlist, args.dim, seed=1)
    xq = make_vectors(args.queries, args.dim, seed=2)

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(centroids)
    flat_ms, truth = per_query_ms(flat, xq, args.nprobe)
    rows = [[f"flat ({centroids.nbytes / 2**20:.0f} MiB)", "-", f"{flat_ms:.2f}", "1.00x", "1.000"]]

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # the build may use every core
    hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    hnsw.add(centroids)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    for ef in args.ef_search or [128, 256, 512, 1024]:
        hnsw.hnsw.efSearch = max(ef, args.nprobe)
        ms, found = per_query_ms(hnsw, xq, args.nprobe)
        rows.append([f"HNSW32, efSearch {hnsw.hnsw.efSearch}", f"{build_s:.0f}", f"{ms:.2f}", f"{ms / flat_ms:.2f}x",
                     f"{overlap(found, truth):.3f}"])  # fmt: skip
    print(f"coarse quantizer: {args.nlist:,} x {args.dim} centroids, {args.queries} single queries on 1 thread, "
          f"top-{args.nprobe} lists")  # fmt: skip
    print(f"machine: {machine()}")
    print(format_table(["quantizer", "build s", "ms / query", "vs flat", f"top-{args.nprobe} lists found"], rows))


if __name__ == "__main__":
    main()
