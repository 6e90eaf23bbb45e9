"""Opening a published version for search: the plan (which version, in this process or through
shard actors) and the opened ``ShardedIndex`` (searching questions: ``raggen.retrieval.search``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from raggen.index.loading import load_version, read_manifest, resolve_version_uri
from raggen.index.search_params import SearchParams
from raggen.index.settings import SearchSettings, wants_actors
from raggen.index.sharded import ShardedIndex


def search_plan(uri: str, version: str | None, settings: SearchSettings, s3_options=None):
    """(version folder / prefix, its manifest, whether to serve it through shard actors) for
    ``uri`` (a root: LATEST is read once, here, so every actor loads the same version)."""
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
    refine_k_factor: float | None = None,
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
    ``use_actors`` / ``actor_num_cpus`` / ``nprobe`` / ``ef_search`` / ``refine_k_factor`` override
    the settings.
    ``load_embeddings``: "auto" (training: the stored vectors, read from the index when it holds
    them exactly), False (serving never reads them), True. ``start_ray``: an entry point's wish
    to start (or join) Ray when the version is to be served by actors and Ray is not running.
    """
    settings = settings or SearchSettings()
    given = {"nprobe": nprobe, "ef_search": ef_search, "refine_k_factor": refine_k_factor,
             "actor_num_cpus": actor_num_cpus}  # fmt: skip
    update = {k: v for k, v in given.items() if v is not None}
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
                          keep_cached_versions=settings.cache_versions, passage_store=settings.local_passages)  # fmt: skip
    return ShardedIndex.from_version(loaded, **SearchParams.of(settings).as_kwargs())
