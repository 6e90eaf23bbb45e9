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

import hashlib
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raggen.errors import ConfigError
from raggen.index.encode import (
    SPLIT_MARKER,
    WORK_MARKER,
    EncodedShard,
    encode_passages,
    encoder_dim,
    lock_work_dir,
    remove_work_dir,
    resolved_passage_format,
    run_signature,
    split_folder_uri,
)
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
from raggen.index.settings import SearchSettings, wants_actors
from raggen.index.shard import (
    build_shard_index,
    new_index,
    normalize_metric,
    open_index_file,
    read_index_file,
    train_index,
    write_index_file,
)
from raggen.index.sharded import SearchResult, ShardedIndex
from raggen.storage import (
    StoreBusy,
    atomic_copy_file,
    atomic_write_bytes,
    check_claimable,
    owns_folder,
    release_folder,
    sha256_file,
)

logger = logging.getLogger(__name__)


def default_work_dir(**signature: Any) -> Path:
    """A stable work dir per (inputs and their content, settings), so rerunning the same build
    resumes it, and a changed corpus gets a new one."""
    key = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "raggen-index-work" / key


def open_work_dir(work_dir: str | os.PathLike | None, signature: dict):
    """(work dir, its marker, its lock) for one build: ``work_dir`` as given (claimed: refused if
    not empty and not raggen's; locked: refused if another run uses it), or the default derived
    from ``signature``; when another build holds that one, a fresh one of this run's own."""
    if work_dir is not None:
        path = Path(os.path.expanduser(str(work_dir)))
        return (path, *lock_work_dir(path))
    path = default_work_dir(**signature)
    try:
        return (path, *lock_work_dir(path))
    except StoreBusy:
        fresh = path.with_name(f"{path.name}-{os.getpid()}-{secrets.token_hex(3)}")
        logger.info("work dir %s is in use by another build; this one works in %s", path, fresh)
        return (fresh, *lock_work_dir(fresh))


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
    ids = table.column("row_id").to_numpy()
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


def encoder_pool(
    num_actors: int | None,
    actor_num_cpus: float,
    actor_num_gpus: float | None,
    torch_threads: int | None,
    resources: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The encoder actor pool, sized from the cluster's resources where not given: one actor per
    GPU on a GPU cluster (``actor_num_gpus`` None: 1 when there are GPUs), else
    ``max(1, (CPUs - max(1, actor_num_cpus) - 0.5) // actor_num_cpus)`` (CPUs left for Ray Data's
    read and tokenise tasks: with fewer the pipeline stalls); each actor
    runs ``actor_num_cpus`` torch threads. ``resources`` default: what the cluster has free now
    (a refresh inside a training run must not wait for the CPUs its own workers hold)."""
    if resources is None:
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
        resources = {"CPU": free.get("CPU", 0) or total.get("CPU", 1), "GPU": free.get("GPU", 0)}
        if total.get("GPU", 0) >= 1 and actor_num_gpus is None:
            actor_num_gpus = 1.0  # a GPU cluster encodes on GPUs, even if they are busy right now
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if actor_num_gpus is None:
        actor_num_gpus = 1.0 if gpus >= 1 else 0.0
    if num_actors is None:
        # Ray Data's read/list tasks (1 CPU) and the tokenise tasks (0.25-0.5 CPU) must still run beside
        # the pool, or the pipeline deadlocks (2 CPUs, 0.5-CPU actors: 1 actor)
        spare = max(1.0, actor_num_cpus) + 0.5
        num_actors = (
            max(1, int(gpus // actor_num_gpus)) if actor_num_gpus > 0 else max(1, int((cpus - spare) // actor_num_cpus))
        )
        logger.info(
            "encoder pool: %d actors of %s CPU, %s GPU (index.num_actors: null = from the cluster)",
            num_actors,
            actor_num_cpus,
            actor_num_gpus,
        )
    return {
        "num_actors": int(num_actors),
        "actor_num_gpus": float(actor_num_gpus),
        "torch_threads": int(torch_threads or max(1, int(actor_num_cpus))),
    }


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
    return sample_queries(xb, tune_queries, seed=seed) if len(xb) else None


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
    index = open_index_file(files[0], ivf="IVF" in faiss_factory.upper())
    table = pq.read_table(encoded.path, columns=["row_id", "embedding"], memory_map=True)
    stats = shard_stats(index, embeddings_of(table), table.column("row_id").to_numpy(), xq, k=tune_k, metric=metric)
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
        tune_queries=tune_queries if target_recall else 0, num_threads=threads))  # fmt: skip
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
    row_ids = np.concatenate([t.column("row_id").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    shards = np.concatenate([np.full(t.num_rows, s, np.int64) for s, t in enumerate(tables)]) if tables else row_ids
    titles = [x for t in tables for x in t.column("title").to_pylist()]
    texts = [x for t in tables for x in t.column("text").to_pylist()]
    return build_bm25_files(titles, texts, row_ids, shards, out_dir)


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


def search_plan(uri: str, version: str | None, settings: SearchSettings, s3_options=None):
    """(version folder / prefix, its manifest, whether to serve it through shard actors) for
    ``uri`` (a root: LATEST is read once, here, so every actor loads the same version)."""
    from raggen.index.manifest import read_manifest, resolve_version_uri

    vuri = resolve_version_uri(uri, version, s3_options=s3_options)
    manifest = read_manifest(vuri, s3_options=s3_options)
    nbytes = None
    if settings.mode == "auto" and manifest.num_passages < settings.auto_actors_passages:
        from raggen.index.actors import shard_bytes

        nbytes = shard_bytes(vuri, manifest, s3_options)
    return vuri, manifest, wants_actors(settings, num_passages=manifest.num_passages, shard_bytes=nbytes)


def open_index(
    uri: str,
    version: str | None = None,
    *,
    settings: SearchSettings | None = None,
    use_actors: bool | None = None,
    actor_num_cpus: float | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    s3_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    load_embeddings: bool | str = "auto",
    group=None,
    start_ray: bool = False,
) -> ShardedIndex:
    """A published version (LATEST by default), verified, ready to ``search``.

    Where the shards live follows ``settings.mode`` (default settings: "auto", i.e. shard actors
    for large versions, see ``SearchSettings``): in this process, or through a new
    ``ShardActorGroup`` that ``close()`` ends. ``group``: search through this (already started)
    group instead, e.g. one the driver passed to Train workers (``close()`` leaves it running).
    ``use_actors`` / ``actor_num_cpus`` / ``nprobe`` / ``ef_search`` override the settings.
    ``load_embeddings``: "auto" (training: the stored vectors, read from the index when it holds
    them exactly), False (serving never reads them), True. ``start_ray``: an entry point's wish
    to start (or join) Ray when the version is to be served by actors and Ray is not running.
    """
    settings = settings or SearchSettings()
    update = {k: v for k, v in {"nprobe": nprobe, "ef_search": ef_search, "actor_num_cpus": actor_num_cpus}.items()
              if v is not None}  # fmt: skip
    if use_actors is not None:
        update["mode"] = "actors" if use_actors else "local"
    settings = settings.model_copy(update=update) if update else settings
    if group is not None:
        return group.sharded_index()
    vuri, manifest, actors = search_plan(uri, version, settings, s3_options)
    if actors:
        from raggen.index.actors import ShardActorGroup

        if start_ray:
            from raggen.ray_utils import ensure_ray

            ensure_ray()

        group = ShardActorGroup.start(vuri, settings=settings, s3_options=s3_options, cache_dir=cache_dir,
                                      manifest=manifest, load_embeddings=load_embeddings)  # fmt: skip
        return group.sharded_index(owned=True)
    loaded = load_version(vuri, s3_options=s3_options, cache_dir=cache_dir, load_embeddings=load_embeddings,
                          keep_cached_versions=settings.cache_versions)  # fmt: skip
    return ShardedIndex.from_version(loaded, nprobe=settings.nprobe, ef_search=settings.ef_search)


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
    settings: SearchSettings | None = None,
    s3_options: Mapping[str, Any] | None = None,
    start_ray: bool = False,
) -> SearchResult:
    """Encode ``questions`` (default: the manifest's encoder and pooling) and search the index;
    ``nprobe`` / ``ef_search`` override the settings' and the version's defaults."""
    from raggen.models.retriever import TextEncoder

    index = open_index(
        uri, version, settings=settings, s3_options=s3_options, load_embeddings=False, start_ray=start_ray
    )
    try:
        enc = index.manifest.encoder
        encoder = TextEncoder.from_pretrained(
            encoder_name_or_path or enc.name_or_path,
            pooling=pooling or enc.pooling,
            max_length=max_length,
            normalize=enc.normalize,
        )
        xq = encoder.encode(list(questions)).numpy()  # (b, d)
        return index.search(
            np.ascontiguousarray(xq, dtype=np.float32), k, nprobe=nprobe, ef_search=ef_search, embeddings=False
        )
    finally:
        index.close()


def publish_index(
    src_uri: str,
    dst_uri: str,
    *,
    version: str | None = None,
    src_version: str | None = None,
    s3_options: Mapping[str, Any] | None = None,
    src_s3_options: Mapping[str, Any] | None = None,
    rollback: bool = False,
    move_latest: bool = True,
) -> Manifest:
    """Copy a published version (``src_uri``: a root with LATEST, or a version folder) to another
    root, e.g. a locally built index to S3. The manifest's files are streamed into a temporary
    folder, verified there, uploaded and verified again in the destination; ``version`` renames
    it there. LATEST at the destination moves forward only, unless ``rollback``."""
    from raggen.index.manifest import read_manifest, resolve_version_uri
    from raggen.storage import open_store

    src_opts = src_s3_options if src_s3_options is not None else s3_options
    version_uri = resolve_version_uri(src_uri, src_version, s3_options=src_opts)
    source = read_manifest(version_uri, s3_options=src_opts)
    src = open_store(version_uri, src_opts)
    with tempfile.TemporaryDirectory(prefix="raggen-publish-") as tmp:
        for name, _ in source.files():
            src.download_file(name, Path(tmp, name))
        atomic_write_bytes(Path(tmp, "manifest.json"), source.to_json().encode())
        manifest = verify_version(tmp)  # the local copy, every checksum and count
        if version is not None:
            manifest = manifest.model_copy(update={"version": version})
        return publish_version(
            dst_uri, manifest, tmp, s3_options=s3_options, rollback=rollback, move_latest=move_latest
        )


def verify_index(
    uri: str,
    version: str | None = None,
    *,
    s3_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Manifest:
    """Check every checksum and count of a published version, on the bytes in the store ``uri``
    names (streamed from it; a local cache is never trusted); returns its manifest."""
    return verify_version(uri, version, s3_options=s3_options, cache_dir=cache_dir)
