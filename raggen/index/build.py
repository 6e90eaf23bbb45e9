"""Orchestration: corpus URI -> encode (Ray Data) -> one FAISS index per shard -> publish.

Plain keyword arguments only (the CLI / configs turn their fields into these). Every stage leaves
its result in the work dir with a done marker, so a rerun with the same arguments (and the same
corpus content) resumes.

Work dirs: raggen uses and deletes only folders it created (a ``.raggen-work`` marker inside); a
``work_dir`` given that is not empty and has no marker is refused with a ConfigError, never
deleted. A work dir is locked while a build uses it: a second build with the same arguments gets a
fresh work dir of its own (the default) or a ConfigError (a ``work_dir`` given).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raggen.errors import ConfigError
from raggen.index.encode import encode_passages
from raggen.index.encoder_actor import encoder_pool
from raggen.index.manifest import Manifest, make_manifest, new_version_name
from raggen.index.publish import publish_version
from raggen.index.shard import new_index, normalize_metric
from raggen.index.shard_files import build_shards_in_tasks, build_sparse_files, build_task_options, check_sparse_kind
from raggen.index.shard_split import SPLIT_MARKER, split_folder_uri
from raggen.index.work_dir import (
    WORK_MARKER,
    encoder_dim,
    open_work_dir,
    remove_work_dir,
    resolved_passage_format,
    run_signature,
)
from raggen.storage import check_claimable, owns_folder, release_folder

logger = logging.getLogger(__name__)


def preflight_build(
    output_uri: str,
    version: str | None,
    *,
    faiss_factory: str,
    metric: str,
    dim: int,
    s3_options: Mapping[str, Any] | None = None,
    work_dir: str | os.PathLike | None = None,
) -> None:
    """What would fail only after hours of encoding, checked first: the factory builds for this
    dimension, the version name is valid and not yet published, the output store answers, and a
    ``work_dir`` given is new, empty or raggen's own."""
    from raggen.index.manifest import MANIFEST_NAME, check_version_name
    from raggen.storage import open_store

    new_index(dim, faiss_factory, metric)  # ConfigError naming faiss_factory
    if version is not None:
        check_version_name(version)
        if open_store(output_uri, s3_options).exists(f"{version}/{MANIFEST_NAME}"):
            raise ConfigError(f"version: {version!r} is already published under {output_uri}")
    if work_dir is not None:
        check_claimable(Path(os.path.expanduser(str(work_dir))), WORK_MARKER, what="work_dir")


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
    num_actors: int | None = None,
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
    move_latest: bool = True,
    rollback: bool = False,
    build_num_cpus: float = 1.0,
    target_recall: float | None = 0.99,
    tune_queries: int = 200,
    tune_k: int = 100,
    work_dir_shared: bool = False,
    sparse: str | None = None,
) -> Manifest:
    """Encode ``passages_uri``, build ``num_shards`` FAISS shards and publish them under ``output_uri``.

    Off the driver: encoding runs in Ray Data's actor pool (``num_actors`` None: sized from the
    cluster, see ``encoder_pool``); quantizer training and the shards run in Ray tasks of
    ``build_num_cpus`` CPUs (and a GPU when there is one and faiss has GPU support), the shards in
    parallel; the driver plans and publishes. The work dir is this machine's, so those tasks run on
    the driver's node; ``work_dir_shared=True`` (the work dir on a filesystem every node mounts at
    the same path) lets them run anywhere. Search defaults: for IVF / HNSW factories, the smallest
    nprobe / efSearch within ``1 - target_recall`` of exhaustive recall@``tune_k`` on
    ``tune_queries`` held-out queries (``raggen.index.tuning``) go into the manifest
    (``target_recall=None``: none). ``sparse="bm25"``: a BM25 index over every passage is built
    (in a Ray task, from the shards' passage files) and published in the same version.

    An index that needs training is trained once, on ``train_sample`` vectors drawn from all
    shards, and every shard starts from it: IVF shards then split each inverted list between them,
    so searching every shard with the same ``nprobe`` scans exactly the lists one unsharded index
    with the same ``faiss_factory`` would, and their approximate scores are comparable.

    Returns the published manifest. LATEST moves to it unless it names a newer version
    (``rollback=True`` moves it anyway; ``move_latest=False`` leaves LATEST alone, e.g. to stage a
    release). Needs a running Ray. ``work_dir`` (default: derived from the arguments and the corpus
    content, so a rerun resumes) is on this (the driver's) machine: new, empty or made by raggen;
    it is deleted at the end (unless ``keep_work_dir``) only if raggen made it. ``split_uri`` is
    where Ray Data's tasks write the per-shard split (shared storage on multi-node clusters): a
    folder of this build's own is made under it and removed with the work dir.
    """
    metric = normalize_metric(metric)
    check_sparse_kind(sparse)
    preflight_build(
        output_uri,
        version,
        faiss_factory=faiss_factory,
        metric=metric,
        dim=encoder_dim(encoder_name_or_path, s3_options),
        s3_options=s3_options,
        work_dir=work_dir,
    )
    signature = run_signature(passages_uri, encoder_name_or_path=encoder_name_or_path, passages_format=passages_format,
                              num_shards=num_shards, pooling=pooling, max_length=max_length, normalize=normalize,
                              passage_format=passage_format, s3_options=s3_options)  # fmt: skip
    work, marker, lock = open_work_dir(work_dir, {**signature, "output_uri": output_uri})
    try:
        pool = encoder_pool(num_actors, actor_num_cpus, actor_num_gpus, torch_threads)
        encoded = encode_passages(
            passages_uri, work, encoder_name_or_path=encoder_name_or_path, pooling=pooling, max_length=max_length,
            normalize=normalize, passage_format=passage_format, batch_size=batch_size, num_shards=num_shards,
            actor_num_cpus=actor_num_cpus, passages_format=passages_format, s3_options=s3_options, split_uri=split_uri, **pool,
        )  # fmt: skip
        out_dir = (
            work / "index" / f"{faiss_factory.replace(',', '_')}-{metric}-{'emb' if store_embeddings else 'noemb'}"
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        files, defaults = build_shards_in_tasks(
            encoded.shards, out_dir, faiss_factory=faiss_factory, metric=metric, dim=encoded.dim, train_sample=train_sample,
            store_embeddings=store_embeddings, target_recall=target_recall, tune_queries=tune_queries, tune_k=tune_k,
            num_cpus=build_num_cpus, work_dir_shared=work_dir_shared,
        )  # fmt: skip
        sparse_files, sparse_params = None, None
        if sparse is not None:
            import ray

            opts = build_task_options(build_num_cpus, pin_to_driver_node=not work_dir_shared)
            opts.pop("num_gpus", None)
            sparse_files, sparse_params = ray.get(ray.remote(build_sparse_files).options(**opts).remote(
                files, out_dir, kind=sparse))  # fmt: skip
        manifest = make_manifest(
            version or new_version_name(), encoder_name_or_path=encoder_name_or_path, pooling=pooling, dim=encoded.dim,
            normalize=normalize, metric=metric, faiss_factory=faiss_factory, shard_files=files,
            passage_format=resolved_passage_format(encoder_name_or_path, passage_format, s3_options),
            search_defaults=defaults, sparse_files=sparse_files, sparse_params=sparse_params,
        )  # fmt: skip
        publish_version(
            output_uri, manifest, out_dir, s3_options=s3_options, move_latest=move_latest, rollback=rollback
        )
        if not keep_work_dir:
            _remove_build_folders(work, split_uri, marker["id"], s3_options)
    finally:
        lock.release()
    return manifest


def _remove_build_folders(work: Path, split_uri: str | None, work_id: str, s3_options) -> None:
    """The split under ``split_uri`` and the work dir, each only if raggen made it (its marker)."""
    if split_uri is not None:
        split = split_folder_uri(work, split_uri, work_id)
        if owns_folder(split, SPLIT_MARKER, s3_options):
            release_folder(split, SPLIT_MARKER, s3_options=s3_options)
    if not remove_work_dir(work):
        logger.warning("work dir %s has no %s marker: left in place", work, WORK_MARKER)
