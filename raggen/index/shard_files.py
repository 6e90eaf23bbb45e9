"""A version's files from its encoded shards: one FAISS index per shard (the quantizer trained
once and shared), built with their search defaults in Ray tasks off the driver, and the optional
sparse index.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raggen.errors import ConfigError
from raggen.index.manifest import shard_file_names
from raggen.index.passage_table import embeddings_of, int64_column, write_parquet_atomic
from raggen.index.settings import QUERY_SIMILARITY
from raggen.index.shard import (
    build_shard_index,
    new_index,
    open_index_file,
    read_index_file,
    train_index,
    write_index_file,
)
from raggen.index.work_dir import EncodedShard
from raggen.storage import atomic_copy_file, atomic_write_bytes, sha256_file

logger = logging.getLogger(__name__)


def train_shared_index(
    shards: list[EncodedShard],
    out_dir: Path,
    *,
    faiss_factory: str,
    metric: str,
    dim: int,
    train_sample: int,
    seed: int = 0,
):
    """One trained (empty) index for every shard, or None when the factory needs no training.

    Trained once on a sample drawn from all shards in proportion to their size: shards that share
    the coarse quantizer and PQ codebooks give comparable approximate scores, so merging their
    top-k is fair (shards trained apart gave half the recall@10 in benchmarks/index.py). Cached
    as ``trained.faiss`` in ``out_dir`` for resumed builds.
    """
    if new_index(dim, faiss_factory, metric).is_trained:
        return None
    path = out_dir / "trained.faiss"
    if path.is_file():
        return read_index_file(path)
    total = sum(s.count for s in shards)
    rng = np.random.default_rng(seed)
    parts = []
    for s in shards:
        take = min(s.count, int(np.ceil(train_sample * s.count / max(total, 1))))
        if take:
            xb = embeddings_of(pq.read_table(s.path, columns=["embedding"]))  # (count, d)
            parts.append(xb[np.sort(rng.choice(s.count, size=take, replace=False))])
    sample = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    index = train_index(sample, factory=faiss_factory, metric=metric, train_sample=len(sample), seed=seed)
    write_index_file(index, path)
    return index


def build_shard_files(
    encoded: EncodedShard,
    out_dir: Path,
    *,
    faiss_factory: str,
    metric: str,
    train_sample: int,
    store_embeddings: bool = True,
    seed: int = 0,
    trained_index=None,
) -> tuple[Path, Path, int]:
    """(index file, passages file, count) for one encoded shard; skipped if already built.

    ``trained_index``: start from this trained, empty index instead of training on the shard."""
    index_name, passages_name = shard_file_names(encoded.shard)
    index_path, passages_path = out_dir / index_name, out_dir / passages_name
    marker = out_dir / f"{index_name}.done.json"
    source_sha = sha256_file(encoded.path)
    if marker.is_file() and json.loads(marker.read_text()).get("source_sha256") == source_sha and index_path.is_file():
        return index_path, passages_path, encoded.count
    table = pq.read_table(encoded.path)
    xb = embeddings_of(table)  # (n, d)
    ids = int64_column(table, "row_id")
    index = build_shard_index(xb, ids, factory=faiss_factory, metric=metric, train_sample=train_sample,
                              seed=seed + encoded.shard, trained_index=trained_index)  # fmt: skip
    write_index_file(index, index_path)
    if store_embeddings:
        atomic_copy_file(encoded.path, passages_path)
    else:
        write_parquet_atomic(table.drop_columns(["embedding"]), passages_path)
    atomic_write_bytes(marker, json.dumps({"source_sha256": source_sha}).encode())
    logger.info("shard %d: %s index over %d vectors -> %s", encoded.shard, faiss_factory, encoded.count, index_path)
    return index_path, passages_path, encoded.count


# ------------------------------------------------------------------------------------------ off the driver


def build_task_options(num_cpus: float, *, pin_to_driver_node: bool) -> dict[str, Any]:
    """Ray options of the FAISS tasks: ``num_cpus``; one GPU when the node(s) they may run on have
    GPUs and faiss has GPU support; pinned to the driver's node while their files live there."""
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus}
    node_id = ray.get_runtime_context().get_node_id()
    if pin_to_driver_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        gpus = next((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]), 0)
    else:
        gpus = ray.cluster_resources().get("GPU", 0)
    import faiss

    if gpus >= 1 and hasattr(faiss, "StandardGpuResources"):
        options["num_gpus"] = 1
    return options


def prepare_build(
    shards: list[EncodedShard],
    out_dir: Path,
    *,
    faiss_factory: str,
    metric: str,
    dim: int,
    train_sample: int,
    tune_queries: int,
    tune_query_similarity: float = QUERY_SIMILARITY,
    num_threads: int = 1,
    seed: int = 0,
) -> np.ndarray | None:
    """(A Ray task.) Train the shared index into ``out_dir/trained.faiss`` (when the factory needs
    training) and sample the tuning queries (None when the type has no search knob)."""
    import faiss

    from raggen.index.tuning import ladder, sample_queries

    faiss.omp_set_num_threads(max(1, int(num_threads)))
    train_shared_index(shards, out_dir, faiss_factory=faiss_factory, metric=metric, dim=dim, train_sample=train_sample,
                       seed=seed)  # fmt: skip
    if not tune_queries or ladder(new_index(dim, faiss_factory, metric)) is None:
        return None
    # shards split the corpus by a hash of the passage id: one shard's vectors are a uniform sample
    first = max(shards, key=lambda e: e.count)
    xb = embeddings_of(pq.read_table(first.path, columns=["embedding"], memory_map=True))  # (count, d)
    return sample_queries(xb, tune_queries, seed=seed, similarity=tune_query_similarity) if len(xb) else None


def build_and_measure_shard(
    encoded: EncodedShard,
    out_dir: Path,
    *,
    faiss_factory: str,
    metric: str,
    train_sample: int,
    store_embeddings: bool,
    xq: np.ndarray | None,
    tune_k: int,
    num_threads: int = 1,
):
    """(A Ray task.) One shard's files (``build_shard_files``, from the shared trained index) and,
    with tuning queries, its ``tuning.ShardStats`` -> ((index path, passages path, count), stats)."""
    import faiss

    from raggen.index.tuning import shard_stats

    faiss.omp_set_num_threads(max(1, int(num_threads)))
    trained_path = out_dir / "trained.faiss"
    trained = read_index_file(trained_path) if trained_path.is_file() else None
    files = build_shard_files(encoded, out_dir, faiss_factory=faiss_factory, metric=metric, train_sample=train_sample,
                              store_embeddings=store_embeddings, trained_index=trained)  # fmt: skip
    if xq is None:
        return files, None
    index = open_index_file(files[0])
    table = pq.read_table(encoded.path, columns=["row_id", "embedding"], memory_map=True)
    stats = shard_stats(index, embeddings_of(table), int64_column(table, "row_id"), xq, k=tune_k, metric=metric)
    return files, stats


def build_shards_in_tasks(
    shards: list[EncodedShard],
    out_dir: Path,
    *,
    faiss_factory: str,
    metric: str,
    dim: int,
    train_sample: int,
    store_embeddings: bool,
    target_recall: float | None,
    tune_queries: int,
    tune_k: int,
    num_cpus: float,
    work_dir_shared: bool,
    tune_query_similarity: float = QUERY_SIMILARITY,
):
    """Quantizer training, then every shard in parallel, in Ray tasks (the driver only waits) ->
    (shard files, search defaults or None). The tasks read the encoded parquet files and write the
    shard files in ``out_dir``: on the driver's node unless ``work_dir_shared`` (a filesystem every
    node mounts at the same path)."""
    import ray

    from raggen.index.tuning import combine

    opts = build_task_options(num_cpus, pin_to_driver_node=not work_dir_shared)
    threads = max(1, int(num_cpus))
    xq = ray.get(ray.remote(prepare_build).options(**opts).remote(
        shards, out_dir, faiss_factory=faiss_factory, metric=metric, dim=dim, train_sample=train_sample,
        tune_queries=tune_queries if target_recall else 0, tune_query_similarity=tune_query_similarity,
        num_threads=threads))  # fmt: skip
    xq_ref = ray.put(xq)
    task = ray.remote(build_and_measure_shard).options(**opts)
    results = ray.get([task.remote(e, out_dir, faiss_factory=faiss_factory, metric=metric, train_sample=train_sample,
                                   store_embeddings=store_embeddings, xq=xq_ref, tune_k=tune_k, num_threads=threads)
                       for e in shards])  # fmt: skip
    files = [f for f, _ in results]
    stats = [st for _, st in results]
    defaults = None
    if xq is not None and all(st is not None for st in stats):
        defaults = combine(stats, k=min(tune_k, sum(e.count for e in shards)), target_recall=float(target_recall))
        logger.info(
            "search defaults for %s: %s", faiss_factory, defaults.model_dump(exclude_none=True) if defaults else None
        )
    return files, defaults


def check_sparse_kind(kind: str | None) -> None:
    from raggen.index.sparse import SPARSE_KINDS

    if kind is not None and kind not in SPARSE_KINDS:
        raise ConfigError(f"index.sparse: one of {', '.join(SPARSE_KINDS)} or null, got {kind!r}")


def build_sparse_files(files: list[tuple[Path, Path, int]], out_dir: Path, *, kind: str = "bm25"):
    """(A Ray task.) The sparse index over every shard's passages, read from the shards' parquet
    files, written into ``out_dir`` -> (its files, its params)."""
    from raggen.index.sparse import build_bm25_files

    check_sparse_kind(kind)
    tables = [pq.read_table(px, columns=["row_id", "title", "text"], memory_map=True) for _, px, _ in files]
    row_ids = np.concatenate([int64_column(t, "row_id") for t in tables]) if tables else np.zeros(0, np.int64)
    shards = np.concatenate([np.full(t.num_rows, s, np.int64) for s, t in enumerate(tables)]) if tables else row_ids
    titles = [x for t in tables for x in t.column("title").to_pylist()]
    texts = [x for t in tables for x in t.column("text").to_pylist()]
    return build_bm25_files(titles, texts, row_ids, shards, out_dir)
