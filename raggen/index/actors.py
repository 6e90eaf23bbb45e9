"""A published version served by a group of Ray shard actors, queried through actor handles.

    ShardActorGroup.start(uri, version, settings=...)      # verified: every actor checked its shards
      -> placement group, one bundle per actor, strategy SPREAD (over the nodes)
      -> ShardServer actors, each serving ``settings.shards_per_actor`` consecutive shards (default:
         one actor per node, the shards split evenly over them: ``actor_assignment``), which it
         loads ONCE from the store itself (sha256 verified, FAISS file memory-mapped, the passage
         texts as compressed blocks and the stored vectors as a ``.npy``, both cache files read
         with ``pread`` (``passage_blocks``, ``passage_vectors``), the vectors only
         when the index cannot give them back)
    group.sharded_index() -> ShardedIndex                    # search(xq, k) like a local index

A caller (Train worker, eval, a Serve replica) keeps its query encoder and sends query vectors;
the caller merges the actors' lists exactly (``merge_hits`` / ``merge_topk``: the same order and
ties) and keeps the winners' payloads (id, title, text; the stored vector only when asked for, for
training). How a query batch travels depends on its size (queries x k):
- up to ``actor_backend.ONE_ROUND_TRIP_MAX_HITS`` (serving's single queries, a training step): as direct calls,
  over a socket each actor opens once loaded (``direct_calls.py``, authenticated with a secret the
  group hands its actors through Ray): every actor's top-k without payloads, then the winners'
  payloads from the actors that hold them. A Ray actor call costs 0.8-2.5 ms on 2 cores before any
  work, a direct round trip ~0.15 ms. Where direct calls are off (``direct_calls: false``) or one
  fails (the actor died or restarted: the caller asks the actors for their new addresses once a
  Ray call went through), the request goes as ONE Ray call per actor, each answering its top-k
  with their payloads (``search_hits``; ``search_packed`` without vectors: one in-band pickle each
  way), which keeps Ray's restart and retry semantics.
- larger (eval's batches): two Ray calls per actor, every actor's top-k without payloads (``topk``),
  then the winners' payloads from the actors that hold them (``fetch``): at k=100 the duplicate
  payloads of one round trip cost more than the round trip.
Texts and vectors never enter the caller's process beyond those hits. ``fetch`` also serves hits
found elsewhere (``ShardedIndex.fetch``, e.g. BM25's).

The group is picklable (handles + manifest): the driver starts one and passes it to N Train
workers, which share it instead of loading N copies; a copy that was passed on never ends the
group (``close`` does only in the process that started it).

This module starts, checks and ends groups; each actor runs ``shard_server.ShardServer``, and a
caller's requests go through ``actor_backend.ActorBackend``. Hot swap (``SwappableIndex``) is in
``hot_swap.py``; groups shared by many callers in ``shared_groups.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from raggen.errors import IndexIntegrityError
from raggen.index.actor_backend import ActorBackend
from raggen.index.direct_calls import new_key
from raggen.index.loading import read_manifest, resolve_version_uri
from raggen.index.manifest import Manifest
from raggen.index.search_params import SearchParams
from raggen.index.settings import SearchSettings
from raggen.index.shard_server import ShardActor, ShardServer, hold_memory_tightly, rss_bytes, serve_from_heap
from raggen.index.sharded import ShardedIndex, resolve_search_params

__all__ = ["ShardActor", "ShardActorGroup", "ShardServer", "actor_assignment", "assign_shards", "hold_memory_tightly",
           "rss_bytes", "serve_from_heap", "shard_bytes", "split_shards"]  # fmt: skip

logger = logging.getLogger(__name__)

ACTOR_NAME_PREFIX = "raggen-shards"  # actors are named <group name>/<actor number>
PLACEMENT_WARN_AFTER_S = 20.0  # a group not placed by then logs what it waits for


def assign_shards(num_shards: int, shards_per_actor: int) -> list[list[int]]:
    """Consecutive shard numbers per actor: actor a serves [a*m, (a+1)*m) (merging the actors'
    lists in order then ties break as over all shards in order)."""
    m = max(1, int(shards_per_actor))
    return [list(range(a, min(a + m, num_shards))) for a in range(0, num_shards, m)]


def split_shards(num_shards: int, num_actors: int) -> list[list[int]]:
    """``num_shards`` split into min(num_shards, num_actors) consecutive runs whose sizes differ by at
    most one (8 shards over 3 actors: 3, 3, 2), in shard order like ``assign_shards``."""
    actors = max(1, min(num_shards, int(num_actors)))
    base, extra = divmod(num_shards, actors)
    bounds = [0]
    for a in range(actors):
        bounds.append(bounds[-1] + base + (a < extra))
    return [list(range(bounds[a], bounds[a + 1])) for a in range(actors)]


def nodes_that_fit(nodes: list[Mapping[str, Any]], bundle: Mapping[str, float]) -> int:
    """Alive nodes (``ray.nodes()`` entries) whose total resources hold ``bundle``: where one shard
    actor can run (a head started with 0 CPUs, as KubeRay heads often are, does not count)."""
    return sum(
        1 for n in nodes
        if n.get("Alive") and all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in bundle.items())
    )  # fmt: skip


def actor_assignment(num_shards: int, settings: SearchSettings, nodes: list[Mapping[str, Any]]) -> list[list[int]]:
    """The shards of each actor: ``settings.shards_per_actor`` consecutive shards per actor, or, when
    it is None, one actor per node that fits one (at least one actor)."""
    if settings.shards_per_actor is not None:
        return assign_shards(num_shards, settings.shards_per_actor)
    return split_shards(num_shards, max(1, nodes_that_fit(nodes, actor_bundle(settings))))


def actor_bundle(settings: SearchSettings) -> dict[str, float]:
    """One shard actor's placement-group bundle."""
    bundle = {"CPU": float(settings.actor_num_cpus)}
    if settings.actor_num_gpus:
        bundle["GPU"] = float(settings.actor_num_gpus)
    return bundle


class ShardActorGroup:
    """Handles to the shard actors serving one version (see the module docstring)."""

    def __init__(
        self,
        *,
        name: str,
        uri: str,
        source_uri: str,
        manifest: Manifest,
        handles: list,
        assignment: list[list[int]],
        settings: SearchSettings,
        placement_group=None,
        owner: bool = False,
        direct_key: bytes | None = None,
        direct_addresses: list[tuple[str, int] | None] | None = None,
    ):
        self.name, self.uri, self.source_uri = name, uri, source_uri
        self.direct_key, self.direct_addresses = direct_key, direct_addresses  # the actors' direct calls
        self.manifest, self.handles, self.assignment = manifest, handles, assignment
        self.settings, self.placement_group = settings, placement_group
        self._owner = owner
        self._closed = False
        self.owner_of = {s: a for a, shards in enumerate(assignment) for s in shards}  # shard number -> actor

    @property
    def version(self) -> str:
        return self.manifest.version

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_owner"] = False  # a copy passed on (to a Train worker) never ends the group
        return state

    @classmethod
    def start(
        cls,
        uri: str,
        version: str | None = None,
        *,
        settings: SearchSettings | None = None,
        s3_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        name: str | None = None,
        manifest: Manifest | None = None,
        load_embeddings: bool | str = "auto",
        timeout_s: float = 600.0,
        source_uri: str | None = None,
    ) -> ShardActorGroup:
        """Start the actors of ``version`` (LATEST when None) and return once every actor has
        loaded and verified its shards: a group that returns is verified. A version that does not
        verify raises IndexIntegrityError; either way a failed start leaves nothing running.
        ``name``: the group's (actors are ``<name>/<n>``); ``source_uri``: the root callers name
        (default ``uri``)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            raise RuntimeError("shard actors need a running Ray: call ray.init() in the entry point")
        settings = settings or SearchSettings(mode="actors")
        vuri = resolve_version_uri(uri, version, s3_options=s3_options)  # a version folder: LATEST read once, here
        manifest = manifest if manifest is not None else read_manifest(vuri, s3_options=s3_options)
        params = resolve_search_params(manifest, SearchParams.of(settings))
        name = name or f"{ACTOR_NAME_PREFIX}-{manifest.version}-{secrets.token_hex(3)}"
        assignment = actor_assignment(len(manifest.shards), settings, [] if settings.shards_per_actor else ray.nodes())
        bundle = actor_bundle(settings)
        direct_key = new_key() if settings.direct_calls else None
        pg = placement_group([dict(bundle) for _ in assignment], strategy="SPREAD", name=name)
        handles: list = []
        try:
            ready, _ = ray.wait([pg.ready()], timeout=min(PLACEMENT_WARN_AFTER_S, timeout_s))
            if not ready and timeout_s > PLACEMENT_WARN_AFTER_S:  # say so while waiting (a Serve replica
                logger.warning(  # otherwise shows only "slow __init__" until the timeout)
                    "shard actors %s: waiting up to %.0f s for the cluster to place %d actors of %s; free now: %s "
                    "(index.search.actor_num_cpus / shards_per_actor)",
                    name, timeout_s, len(assignment), bundle, _free_resources(ray),
                )  # fmt: skip
                ready, _ = ray.wait([pg.ready()], timeout=timeout_s - PLACEMENT_WARN_AFTER_S)
            if not ready:
                raise RuntimeError(
                    f"shard actors: the cluster cannot place {len(assignment)} actors of {bundle} "
                    f"within {timeout_s:.0f} s; free: {_free_resources(ray)} (index.search.actor_num_cpus / "
                    "shards_per_actor)"
                )
            remote = ray.remote(ShardServer)
            for a, shards in enumerate(assignment):
                handles.append(remote.options(
                    name=f"{name}/{a}", num_cpus=settings.actor_num_cpus, num_gpus=settings.actor_num_gpus or 0,
                    max_concurrency=settings.actor_max_concurrency,
                    max_restarts=settings.actor_max_restarts,
                    max_task_retries=settings.actor_search_retries if settings.actor_max_restarts else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=a),
                ).remote(vuri, shards, s3_options=dict(s3_options) if s3_options else None,
                         cache_dir=None if cache_dir is None else str(cache_dir), load_embeddings=load_embeddings,
                         params=params, num_cpus=settings.actor_num_cpus,
                         use_gpu=bool(settings.actor_num_gpus), keep_cached_versions=settings.cache_versions,
                         expect_version=manifest.version, passage_store=settings.actor_passages,
                         direct_key=direct_key, direct_identity=f"{name}/{a}",
                         max_concurrency=settings.actor_max_concurrency))  # fmt: skip
            infos = _get(ray, [h.ready.remote() for h in handles], timeout_s, vuri)
        except BaseException:
            for h in handles:
                ray.kill(h)
            remove_placement_group(pg)
            raise
        group = cls(
            name=name,
            uri=vuri,
            source_uri=source_uri or str(uri),
            manifest=manifest,
            handles=handles,
            assignment=assignment,
            settings=settings,
            placement_group=pg,
            owner=True,
            direct_key=direct_key,
            direct_addresses=[i.get("direct_address") for i in infos] if direct_key else None,
        )
        nodes = {i["node_id"] for i in infos}
        logger.info(
            "shard actors %s: version %s, %d actors over %d node(s), nprobe %s, efSearch %s, refine k_factor %s",
            name,
            manifest.version,
            len(handles),
            len(nodes),
            params.nprobe,
            params.ef_search,
            params.refine_k_factor,
        )
        return group

    def sharded_index(
        self,
        *,
        query_batch_size: int = 256,
        owned: bool = False,
        on_close: Callable[[], None] | None = None,
        direct_calls: bool = True,
    ) -> ShardedIndex:
        """A ShardedIndex searching through this group; ``owned``: its ``close()`` ends the group;
        ``on_close``: called (once) by its ``close()`` instead, e.g. to return a shared group's lease;
        ``direct_calls=False``: Ray calls only, even where the group takes direct calls."""
        return ShardedIndex(
            ActorBackend(self, owned=owned, on_close=on_close, direct_calls=direct_calls),
            manifest=self.manifest,
            dim=self.manifest.encoder.dim,
            query_batch_size=query_batch_size,
            params=resolve_search_params(self.manifest, SearchParams.of(self.settings)),
        )

    def alive(self, timeout_s: float = 30.0) -> bool:
        """Every actor answers (a group whose node went away is not lent again)."""
        import ray

        try:
            ray.get([h.ready.remote() for h in self.handles], timeout=timeout_s)
        except Exception:  # noqa: BLE001 - dead actor, lost node, timeout: not usable
            return False
        return True

    def info(self) -> list[dict[str, Any]]:
        """Each actor's ``ShardServer.info()`` (pid, node, RSS, shards, queries served)."""
        import ray

        return ray.get([h.info.remote() for h in self.handles])

    def close(self, *, force: bool = False) -> None:
        """End the actors and their placement group: in the process that started the group, or
        anywhere with ``force`` (e.g. the last user of a group nobody else searches)."""
        if self._closed or not (self._owner or force):
            return
        import ray
        from ray.util.placement_group import remove_placement_group

        self._closed = True
        for h in self.handles:
            with contextlib.suppress(Exception):
                ray.kill(h)
        if self.placement_group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_group)
        logger.info("shard actors %s (version %s) ended", self.name, self.version)


def _free_resources(ray) -> dict[str, float]:
    """The cluster's unreserved CPU / GPU, for a message."""
    try:
        free = ray.available_resources()
    except Exception:  # noqa: BLE001 - only for a message
        return {}
    return {k: round(v, 2) for k, v in free.items() if k in ("CPU", "GPU")}


def _get(ray, refs: list, timeout_s: float, vuri: str) -> list:
    """ray.get; an actor that failed to load its shards because they do not verify raises
    IndexIntegrityError (the actor's own message), anything else as Ray raised it."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"{vuri}: shard actors not ready after {timeout_s:.0f} s") from None
    except ray.exceptions.RayError as exc:
        text = str(exc)
        if "IndexIntegrityError" in text:
            lines = [ln.strip() for ln in text.splitlines() if "IndexIntegrityError" in ln]
            detail = lines[-1].split("IndexIntegrityError:", 1)[-1].strip() if lines else text.splitlines()[-1]
            raise IndexIntegrityError(detail) from None
        raise


def shard_bytes(version_uri: str, manifest: Manifest, s3_options=None) -> int | None:
    """Total size of a version's shard files in its store (None when it cannot be listed)."""
    from raggen.storage import LocalStore, open_store

    store = open_store(version_uri, s3_options)
    names = {n for n, _ in manifest.files()}
    try:
        if isinstance(store, LocalStore):
            return sum(store.local_path(n).stat().st_size for n in names)
        return sum(size for name, size, _ in store.list_with_info() if name in names)
    except (OSError, AttributeError):
        return None
