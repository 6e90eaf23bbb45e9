"""Orchestration: corpus URI -> encode (Ray Data) -> one FAISS index per shard -> publish.

Settings arrive as typed objects (``EncoderSpec``, ``IndexBuildSettings``, ``SearchSettings``: the
config's ``index`` section embeds or inherits them); what changes per call (corpus, output root,
version, work dir) is a keyword argument. Every stage leaves its result in the work dir with a done
marker, so a rerun with the same arguments (and the same corpus content) resumes.

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
from raggen.index.build_settings import IndexBuildSettings
from raggen.index.encode import encode_passages
from raggen.index.manifest import Manifest, make_manifest, new_version_name
from raggen.index.publish import publish_version
from raggen.index.settings import SearchSettings
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
from raggen.models.specs import EncoderSpec
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
    encoder: EncoderSpec,
    settings: IndexBuildSettings | None = None,
    search: SearchSettings | None = None,
    passages_format: str = "auto",
    version: str | None = None,
    work_dir: str | os.PathLike | None = None,
    keep_work_dir: bool = False,
    split_uri: str | None = None,
    s3_options: Mapping[str, Any] | None = None,
    move_latest: bool = True,
    rollback: bool = False,
    torch_threads: int | None = None,
) -> Manifest:
    """Encode ``passages_uri`` with ``encoder``, build ``settings.num_shards`` FAISS shards and
    publish them under ``output_uri`` (``settings`` None: ``IndexBuildSettings()``, the config's
    defaults).

    Off the driver: encoding runs in Ray Data's actor pool (``settings.num_actors`` None: sized from
    the cluster, see ``encoder_pool``; ``torch_threads``: each actor's, default from
    ``settings.actor_num_cpus``); quantizer training and the shards run in Ray tasks of
    ``settings.build_num_cpus`` CPUs (and a GPU when there is one and faiss has GPU support), the
    shards in parallel; the driver plans and publishes. The work dir is this machine's, so those
    tasks run on the driver's node; ``settings.work_dir_shared`` (the work dir on a filesystem every
    node mounts at the same path) lets them run anywhere. Search defaults: for IVF / HNSW factories,
    the smallest nprobe / efSearch (re-ranked factories: and refine k_factor) within
    ``1 - search.target_recall`` of exhaustive recall@``search.tune_k`` on ``search.tune_queries``
    held-out queries (``raggen.index.tuning``; the
    other ``SearchSettings`` fields are not used here; ``search`` None: ``SearchSettings()``) go into
    the manifest (``target_recall=None``: none). ``settings.sparse="bm25"``: a BM25 index over every
    passage is built (in a Ray task, from the shards' passage files) and published in the same version.

    An index that needs training is trained once, on ``settings.train_sample`` vectors drawn from all
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
    settings = settings if settings is not None else IndexBuildSettings()
    search = search if search is not None else SearchSettings()
    metric = normalize_metric(settings.metric)
    check_sparse_kind(settings.sparse)
    preflight_build(
        output_uri,
        version,
        faiss_factory=settings.faiss_factory,
        metric=metric,
        dim=encoder_dim(encoder.name_or_path, s3_options),
        s3_options=s3_options,
        work_dir=work_dir,
    )
    signature = run_signature(passages_uri, encoder_name_or_path=encoder.name_or_path, passages_format=passages_format,
                              num_shards=settings.num_shards, pooling=encoder.pooling, max_length=encoder.max_length,
                              normalize=encoder.normalize, passage_format=encoder.passage_format,
                              passage_prefix=encoder.passage_prefix, s3_options=s3_options)  # fmt: skip
    work, marker, lock = open_work_dir(work_dir, {**signature, "output_uri": output_uri})
    try:
        encoded = encode_passages(
            passages_uri, work, encoder=encoder, settings=settings, passages_format=passages_format,
            s3_options=s3_options, split_uri=split_uri, torch_threads=torch_threads,
        )  # fmt: skip
        factory, store_embeddings = settings.faiss_factory, settings.store_embeddings
        out_dir = work / "index" / f"{factory.replace(',', '_')}-{metric}-{'emb' if store_embeddings else 'noemb'}"
        out_dir.mkdir(parents=True, exist_ok=True)
        files, defaults = build_shards_in_tasks(
            encoded.shards, out_dir, faiss_factory=factory, metric=metric, dim=encoded.dim,
            train_sample=settings.train_sample, store_embeddings=store_embeddings, target_recall=search.target_recall,
            tune_queries=search.tune_queries, tune_k=search.tune_k, num_cpus=settings.build_num_cpus,
            work_dir_shared=settings.work_dir_shared, tune_query_similarity=search.tune_query_similarity,
        )  # fmt: skip
        sparse_files, sparse_params = None, None
        if settings.sparse is not None:
            import ray

            opts = build_task_options(settings.build_num_cpus, pin_to_driver_node=not settings.work_dir_shared)
            opts.pop("num_gpus", None)
            sparse_files, sparse_params = ray.get(ray.remote(build_sparse_files).options(**opts).remote(
                files, out_dir, kind=settings.sparse))  # fmt: skip
        manifest = make_manifest(
            version or new_version_name(), encoder_name_or_path=encoder.name_or_path, pooling=encoder.pooling,
            dim=encoded.dim, normalize=encoder.normalize, metric=metric, faiss_factory=factory, shard_files=files,
            passage_format=resolved_passage_format(encoder.name_or_path, encoder.passage_format, s3_options),
            query_prefix=encoder.query_prefix or "", passage_prefix=encoder.passage_prefix,
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
