"""Orchestration: corpus URI -> encode (Ray Data) -> one FAISS index per shard -> publish.

Plain keyword arguments only (the CLI / configs turn their fields into these). Every stage leaves
its result in the work dir with a done marker, so a rerun with the same arguments resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow.parquet as pq

from raggen.errors import ConfigError
from raggen.index.encode import EncodedShard, encode_passages, encoder_dim, resolved_passage_format
from raggen.index.manifest import (
    Manifest,
    embeddings_of,
    load_version,
    make_manifest,
    new_version_name,
    publish_version,
    shard_file_names,
    verify_version,
    write_parquet_atomic,
)
from raggen.index.shard import build_shard_index, new_index, normalize_metric, read_index_file, train_index, write_index_file
from raggen.index.sharded import SearchResult, ShardedIndex
from raggen.storage import atomic_write_bytes, sha256_file

logger = logging.getLogger(__name__)


def default_work_dir(**signature: Any) -> Path:
    """A stable work dir per (inputs, settings), so rerunning the same build resumes it."""
    key = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "raggen-index-work" / key


def train_shared_index(
    shards: list[EncodedShard], out_dir: Path, *, faiss_factory: str, metric: str, dim: int, train_sample: int, seed: int = 0
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
    ids = table.column("row_id").to_numpy()
    index = build_shard_index(xb, ids, factory=faiss_factory, metric=metric, train_sample=train_sample,
                              seed=seed + encoded.shard, trained_index=trained_index)  # fmt: skip
    write_index_file(index, index_path)
    if store_embeddings:
        shutil.copyfile(encoded.path, passages_path)
    else:
        write_parquet_atomic(table.drop_columns(["embedding"]), passages_path)
    atomic_write_bytes(marker, json.dumps({"source_sha256": source_sha}).encode())
    logger.info("shard %d: %s index over %d vectors -> %s", encoded.shard, faiss_factory, encoded.count, index_path)
    return index_path, passages_path, encoded.count


def preflight_build(output_uri: str, version: str | None, *, faiss_factory: str, metric: str, dim: int,
                    s3_options: Mapping[str, Any] | None = None) -> None:
    """What would fail only after hours of encoding, checked first: the factory builds for this
    dimension, the version name is valid and not yet published, and the output store answers."""
    from raggen.index.manifest import MANIFEST_NAME, check_version_name
    from raggen.storage import open_store

    new_index(dim, faiss_factory, metric)  # ConfigError naming faiss_factory
    if version is not None:
        check_version_name(version)
        if open_store(output_uri, s3_options).exists(f"{version}/{MANIFEST_NAME}"):
            raise ConfigError(f"version: {version!r} is already published under {output_uri}")


def build_index(
    passages_uri: str,
    output_uri: str,
    *,
    encoder_name_or_path: str,
    pooling: str = "mean",
    max_length: int = 256,
    normalize: bool = False,
    passage_format: str | None = None,
    batch_size: int = 64,
    num_shards: int = 1,
    faiss_factory: str = "Flat",
    metric: str = "ip",
    train_sample: int = 100_000,
    num_actors: int = 1,
    actor_num_cpus: float = 1.0,
    actor_num_gpus: float | None = None,
    torch_threads: int | None = None,
    passages_format: str = "auto",
    store_embeddings: bool = True,
    version: str | None = None,
    work_dir: str | os.PathLike | None = None,
    keep_work_dir: bool = False,
    split_uri: str | None = None,
    s3_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Encode ``passages_uri``, build ``num_shards`` FAISS shards and publish them under ``output_uri``.

    An index that needs training is trained once, on ``train_sample`` vectors drawn from all
    shards, and every shard starts from it: IVF shards then split each inverted list between them,
    so searching every shard with the same ``nprobe`` scans exactly the lists one unsharded index
    with the same ``faiss_factory`` would, and their approximate scores are comparable.

    Returns the published manifest (LATEST now points at it). Needs a running Ray. ``work_dir``
    (default: derived from the arguments, so a rerun resumes) is on this (the driver's) machine;
    ``split_uri`` is where Ray Data's tasks write the per-shard split (shared storage on
    multi-node clusters, see ``raggen.index.encode``).
    """
    metric = normalize_metric(metric)
    preflight_build(output_uri, version, faiss_factory=faiss_factory, metric=metric,
                    dim=encoder_dim(encoder_name_or_path, s3_options), s3_options=s3_options)
    work = Path(work_dir) if work_dir else default_work_dir(
        passages_uri=passages_uri, output_uri=output_uri, encoder=encoder_name_or_path, pooling=pooling,
        max_length=max_length, normalize=normalize, num_shards=num_shards, format=passages_format,
        passage_format=passage_format,
    )  # fmt: skip
    encoded = encode_passages(
        passages_uri, work, encoder_name_or_path=encoder_name_or_path, pooling=pooling, max_length=max_length,
        normalize=normalize, passage_format=passage_format, batch_size=batch_size, num_shards=num_shards, num_actors=num_actors, actor_num_cpus=actor_num_cpus,
        actor_num_gpus=actor_num_gpus, torch_threads=torch_threads, passages_format=passages_format, s3_options=s3_options, split_uri=split_uri,
    )  # fmt: skip
    out_dir = work / "index" / f"{faiss_factory.replace(',', '_')}-{metric}-{'emb' if store_embeddings else 'noemb'}"
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = train_shared_index(encoded.shards, out_dir, faiss_factory=faiss_factory, metric=metric,
                                 dim=encoded.dim, train_sample=train_sample)  # fmt: skip
    files = [
        build_shard_files(e, out_dir, faiss_factory=faiss_factory, metric=metric, train_sample=train_sample,
                          store_embeddings=store_embeddings, trained_index=trained)
        for e in encoded.shards
    ]  # fmt: skip
    manifest = make_manifest(
        version or new_version_name(), encoder_name_or_path=encoder_name_or_path, pooling=pooling, dim=encoded.dim,
        normalize=normalize, metric=metric, faiss_factory=faiss_factory, shard_files=files,
        passage_format=resolved_passage_format(encoder_name_or_path, passage_format, s3_options),
    )  # fmt: skip
    publish_version(output_uri, manifest, out_dir, s3_options=s3_options)
    if not keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def open_index(
    uri: str,
    version: str | None = None,
    *,
    use_actors: bool = False,
    actor_num_cpus: float = 1.0,
    nprobe: int | None = None,
    ef_search: int | None = None,
    s3_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ShardedIndex:
    """Load + verify a published version (LATEST by default) and wrap it for search."""
    loaded = load_version(uri, version, s3_options=s3_options, cache_dir=cache_dir)
    return ShardedIndex.from_version(loaded, use_actors=use_actors, actor_num_cpus=actor_num_cpus, nprobe=nprobe, ef_search=ef_search)


def search_index(
    uri: str,
    questions: list[str],
    k: int = 5,
    *,
    encoder_name_or_path: str | None = None,
    pooling: str | None = None,
    max_length: int = 64,
    version: str | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    s3_options: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Encode ``questions`` (default: the manifest's encoder and pooling) and search the index."""
    from raggen.models.retriever import TextEncoder

    index = open_index(uri, version, nprobe=nprobe, ef_search=ef_search, s3_options=s3_options)
    enc = index.manifest.encoder
    encoder = TextEncoder.from_pretrained(encoder_name_or_path or enc.name_or_path, pooling=pooling or enc.pooling,
                                          max_length=max_length, normalize=enc.normalize)
    xq = encoder.encode(list(questions)).numpy()  # (b, d)
    return index.search(np.ascontiguousarray(xq, dtype=np.float32), k)


def publish_index(
    src_uri: str,
    dst_uri: str,
    *,
    version: str | None = None,
    src_version: str | None = None,
    s3_options: Mapping[str, Any] | None = None,
    src_s3_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Copy a published version (``src_uri``: a root with LATEST, or a version folder) to another
    root, e.g. a locally built index to S3. The source is verified first, the copy on upload;
    ``version`` renames it at the destination."""
    from raggen.index.manifest import resolve_version_uri
    from raggen.storage import download

    src_opts = src_s3_options if src_s3_options is not None else s3_options
    version_uri = resolve_version_uri(src_uri, src_version, s3_options=src_opts)
    with tempfile.TemporaryDirectory(prefix="raggen-publish-") as tmp:
        download(version_uri, tmp, s3_options=src_opts)
        manifest = verify_version(tmp)  # the local copy, every checksum and count
        if version is not None:
            manifest = manifest.model_copy(update={"version": version})
        return publish_version(dst_uri, manifest, tmp, s3_options=s3_options)


def verify_index(uri: str, version: str | None = None, *, s3_options: Mapping[str, Any] | None = None) -> Manifest:
    """Check every checksum and count of a published version; returns its manifest."""
    return verify_version(uri, version, s3_options=s3_options)
