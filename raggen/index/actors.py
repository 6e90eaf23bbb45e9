"""A published version served by a group of Ray shard actors, queried through actor handles.

    ShardActorGroup.start(uri, version, settings=...)      # verified: every actor checked its shards
      -> placement group, one bundle per actor, strategy SPREAD (over the nodes)
      -> ShardServer actors, each serving ``settings.shards_per_actor`` consecutive shards, which it
         loads ONCE from the store itself (sha256 verified, FAISS file memory-mapped, the passage
         texts as compressed blocks and the stored vectors as a ``.npy``, both cache files read
         with ``pread`` (``passage_blocks``, ``passage_vectors``), the vectors only
         when the index cannot give them back)
    group.sharded_index() -> ShardedIndex                    # search(xq, k) like a local index

A caller (Train worker, eval, a Serve replica) keeps its query encoder and sends query vectors;
the caller merges the actors' lists exactly (``merge_hits`` / ``merge_topk``: the same order and
ties) and keeps the winners' payloads (id, title, text; the stored vector only when asked for, for
training). How a query batch travels depends on its size (queries x k):
- up to ``ONE_ROUND_TRIP_MAX_HITS`` (serving's single queries, a training step): as direct calls,
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

Hot swap (``SwappableIndex``) is in ``hot_swap.py``; groups shared by many callers in
``shared_groups.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from raggen.errors import IndexIntegrityError
from raggen.index.direct_calls import DirectCallError, DirectClient, DirectServer, new_key
from raggen.index.hits import Hits, fill_hits, merge_hits, merge_topk, requests_of
from raggen.index.loading import load_version, read_manifest, resolve_version_uri
from raggen.index.manifest import Manifest
from raggen.index.search_params import NO_OVERRIDES, SearchParams
from raggen.index.settings import SearchSettings
from raggen.index.shard_searcher import ShardSearcher, _LocalBackend
from raggen.index.sharded import ShardedIndex, resolve_search_params

logger = logging.getLogger(__name__)

ACTOR_NAME_PREFIX = "raggen-shards"  # actors are named <group name>/<actor number>
ONE_ROUND_TRIP_MAX_HITS = 256  # queries x k up to which a request is small (see _ActorBackend.search_hits)
DIRECT_TOPK, DIRECT_FETCH, DIRECT_PING = b"t", b"f", b"p"  # ops of a shard actor's direct calls (direct_calls.py)
DIRECT_RETRY_AFTER_S = 5.0  # after a failed direct call a caller uses Ray calls for this long
PLACEMENT_WARN_AFTER_S = 20.0  # a group not placed by then logs what it waits for


def rss_bytes() -> int:
    """This process's resident set size (VmRSS), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 << 10  # while loading: glibc's initial value, kept fixed
SERVING_MMAP_THRESHOLD_BYTES = 32 << 20  # once loaded: the ceiling of glibc's own dynamic threshold (64-bit)


def _set_mmap_threshold(nbytes: int) -> bool:
    """glibc's M_MMAP_THRESHOLD (blocks of at least ``nbytes`` are mapped on their own and unmapped
    when freed); False where glibc is absent."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


def hold_memory_tightly() -> bool:
    """Make freed memory leave this process while it loads (a shard actor: loads once, then serves;
    ``serve_from_heap`` ends the glibc part once loaded).

    * Arrow allocates from the system allocator: its default (mimalloc) keeps much of the
      parquet decoder's scratch resident after the shard's table is built.
    * glibc's mmap threshold stays at 128 KiB: by default it rises to the largest block freed
      (hashing reads 8 MiB chunks), after which every block below it comes from the heap and
      stays there once freed.

    Measured on an actor with two 250k-passage shards (60 MB of files): peak RSS 342 -> 280 MB,
    anon above an idle actor 134 -> 71 MB. Returns False where glibc is absent (the Arrow part
    still applies)."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    return _set_mmap_threshold(MMAP_THRESHOLD_BYTES)


def serve_from_heap() -> bool:
    """Once the shards are loaded: blocks below 32 MiB come from the heap again and are reused.

    Kept at 128 KiB, every block of 128 KiB or more that a query allocates (FAISS's search scratch,
    a batch's results) is a fresh mapping, faulted in page by page and unmapped when freed. Measured
    in a shard actor with 4 IVF-PQ shards of 62.5k passages (its methods on a thread pool,
    max_concurrency 4): one query's search 0.90 -> 0.39 ms, with its 10 texts 1.59 -> 1.07 ms;
    RSS after 500 single and 600 batched k=100 queries the same (270 MB). False where glibc is absent."""
    return _set_mmap_threshold(SERVING_MMAP_THRESHOLD_BYTES)


class ShardServer:
    """One shard actor: serves shards ``shards`` (numbers in the manifest) of one version.

    Loads them from the store in ``__init__`` (every checksum verified; a version that does not
    verify fails the actor, hence the group's start). ``search_hits`` returns this actor's merged
    top-k with global shard numbers and the hits' payloads (what a ShardedIndex search calls);
    ``fetch`` the payloads of given row ids per shard. ``info()`` counts queries and calls per
    method."""

    def __init__(
        self,
        version_uri: str,
        shards: list[int],
        *,
        s3_options=None,
        cache_dir=None,
        load_embeddings: bool | str = "auto",
        params: SearchParams = NO_OVERRIDES,
        num_cpus: float = 1.0,
        use_gpu: bool = False,
        keep_cached_versions: int | None = 2,
        expect_version: str | None = None,
        passage_store: str = "mapped",
        direct_key: bytes | None = None,
        direct_identity: str = "",
        max_concurrency: int = 4,
    ):
        import faiss

        hold_memory_tightly()  # this process loads its shards once, then only serves them
        threads = max(1, int(num_cpus))
        faiss.omp_set_num_threads(threads)
        loaded = load_version(
            version_uri,
            s3_options=s3_options,
            cache_dir=cache_dir,
            load_embeddings=load_embeddings,
            shards=shards,
            keep_cached_versions=keep_cached_versions,
            passage_store=passage_store,  # "mapped": texts and vectors read from the node's cache
        )
        if expect_version is not None and loaded.version != expect_version:
            raise IndexIntegrityError(f"{version_uri}: holds version {loaded.version!r}, expected {expect_version!r}")
        serve_from_heap()  # loaded: what follows is per-query scratch, reused from the heap
        self.version, self.shards = loaded.version, [int(s) for s in shards]
        metric = loaded.manifest.metric
        searchers = [ShardSearcher(s.index(), s.passages, metric=metric, params=params, use_gpu=use_gpu,
                                   num_threads=threads, texts=s.texts, vectors=s.vectors)
                     for s in loaded.shards]  # fmt: skip
        self.backend = _LocalBackend(searchers, max_workers=threads, cpus=threads, shard_numbers=self.shards)
        self.counts = [int(s.entry.count) for s in loaded.shards]
        self.embeddings_loaded = [s.has_embeddings for s in loaded.shards]
        self.queries = 0
        self.calls: Counter[str] = Counter()  # method -> calls served (max_concurrency > 1: a lock)
        self._count_lock = threading.Lock()
        self.direct: DirectServer | None = None
        if direct_key:  # small requests may come over a socket too (direct_calls.py), started once loaded
            import ray

            host = ray.util.get_node_ip_address()
            try:
                self.direct = DirectServer(self._direct_call, key=direct_key, identity=direct_identity, host=host,
                                           max_concurrent_calls=max_concurrency)  # fmt: skip
            except OSError as exc:  # never fail the actor for it: its callers use Ray calls
                logger.warning("shard actor %s: no direct calls (cannot listen on %s: %s)", direct_identity, host, exc)

    def _direct_call(self, op: bytes, payload: bytes) -> bytes:
        """A direct call (a small request, see ``_ActorBackend.search_hits``): ``topk`` or ``fetch``,
        arguments and answer pickled; or a ping (nothing: the round trip alone)."""
        if op == DIRECT_TOPK:
            xq, k, params = pickle.loads(payload)
            answer: Any = self._topk(xq, k, params, counter="direct_topk")
        elif op == DIRECT_FETCH:
            requests, embeddings = pickle.loads(payload)
            answer = self._fetch(requests, embeddings, counter="direct_fetch")
        elif op == DIRECT_PING:
            return b""
        else:
            raise ValueError(f"unknown direct call {op!r}")
        return pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)

    def direct_address(self) -> tuple[str, int] | None:
        """Where this actor takes direct calls (None: it does not); a restarted actor has a new one."""
        return self.direct.address if self.direct is not None else None

    def _count(self, method: str, queries: int = 0) -> None:
        with self._count_lock:
            self.calls[method] += 1
            self.queries += queries

    def search_hits(self, xq: np.ndarray, k: int, params: SearchParams = NO_OVERRIDES, embeddings: bool = True) -> Hits:
        """(b, d), k -> this actor's top-k with payloads (k per query, see the module docstring)."""
        self._count("search_hits", len(xq))
        return self.backend.search_hits(xq, k, params, embeddings)

    def search_packed(self, request: bytes) -> bytes:
        """``search_hits`` for a small request: its arguments and its answer each travel as ONE
        in-band pickle (``_ActorBackend.search_hits`` sends it). Ray handles every argument, and every
        array in an answer, as an object of its own (designed for large zero-copy buffers); for a
        single query that costs more than the search. Measured on 2 cores: a call with
        ``search_hits``' 6 arguments and a 10-hit answer 1.19 ms, packed 0.83 ms, a no-op call 0.79."""
        xq, k, params, embeddings = pickle.loads(request)
        self._count("search_packed", len(xq))
        hits = self.backend.search_hits(xq, k, params, embeddings)
        return pickle.dumps(hits, protocol=pickle.HIGHEST_PROTOCOL)

    def topk(
        self, xq: np.ndarray, k: int, params: SearchParams = NO_OVERRIDES
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(b, d), k -> this actor's merged top-k without payloads: scores, row ids and global shard
        numbers, (b, k) each (a large batch then fetches only the winners' payloads)."""
        return self._topk(xq, k, params, counter="topk")

    def fetch(self, requests: dict[int, np.ndarray], embeddings: bool = True) -> dict[int, tuple]:
        """{shard number: row ids (n,)} -> {shard number: (ids, titles, texts, vectors (n, d) or None)}."""
        return self._fetch(requests, embeddings, counter="fetch")

    def _topk(self, xq: np.ndarray, k: int, params: SearchParams, *, counter: str):
        """``topk``'s work, for a Ray call or a direct one (each counted under its own name)."""
        self._count(counter, len(xq))
        return self.backend.topk(xq, k, params)

    def _fetch(self, requests: dict[int, np.ndarray], embeddings: bool, *, counter: str) -> dict[int, tuple]:
        self._count(counter)
        return {int(s): part for s, part in self.backend.fetch(requests, embeddings).items()}

    def info(self) -> dict[str, Any]:
        import ray

        return {"version": self.version, "shards": self.shards, "counts": self.counts, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "rss_bytes": rss_bytes(),
                "queries": self.queries, "calls": dict(self.calls),
                "embeddings_loaded": self.embeddings_loaded, "direct_address": self.direct_address(),
                "direct_connections": self.direct.connections() if self.direct is not None else 0}  # fmt: skip

    def ready(self) -> dict[str, Any]:
        return self.info()

    def ping(self) -> None:
        """Nothing: a call's cost through Ray alone (the floor under ``search_hits``' latency)."""


ShardActor = ShardServer  # the class each Ray actor runs (wrapped with ray.remote at start-up)


def assign_shards(num_shards: int, shards_per_actor: int) -> list[list[int]]:
    """Consecutive shard numbers per actor: actor a serves [a*m, (a+1)*m) (merging the actors'
    lists in order then ties break as over all shards in order)."""
    m = max(1, int(shards_per_actor))
    return [list(range(a, min(a + m, num_shards))) for a in range(0, num_shards, m)]


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
        assignment = assign_shards(len(manifest.shards), settings.shards_per_actor)
        bundle = {"CPU": float(settings.actor_num_cpus)}
        if settings.actor_num_gpus:
            bundle["GPU"] = float(settings.actor_num_gpus)
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
            _ActorBackend(self, owned=owned, on_close=on_close, direct_calls=direct_calls),
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


class _ActorBackend:
    """The ShardedIndex backend that searches through a ShardActorGroup."""

    kind = "actors"

    def __init__(
        self,
        group: ShardActorGroup,
        *,
        owned: bool = False,
        on_close: Callable[[], None] | None = None,
        direct_calls: bool = True,
    ):
        import ray

        self.ray = ray
        self.group = group
        self.owned = owned
        self._on_close = on_close
        self.direct: DirectClient | None = None
        addresses = group.direct_addresses or []
        if direct_calls and group.direct_key and addresses and all(a is not None for a in addresses):
            identities = [f"{group.name}/{a}" for a in range(len(group.handles))]
            self.direct = DirectClient(group.direct_key, identities)
        self._addresses = list(addresses)
        self._direct_retry_at = 0.0  # time.monotonic() before which small requests use Ray calls
        self._addresses_stale = False

    def search_hits(self, xq: np.ndarray, k: int, params: SearchParams = NO_OVERRIDES, embeddings: bool = True) -> Hits:
        """The exact top-k over all actors with payloads, merged here (``merge_hits`` / ``merge_topk``:
        the same winners and ties either way).

        * A small request (at most ONE_ROUND_TRIP_MAX_HITS hits: serving's single queries, a training
          step) goes as direct calls when the group takes them: every actor's top-k without
          payloads, then the winners' payloads from the actors that hold them, each round trip
          ~0.15 ms instead of a Ray call's 0.8-2.5 ms (``direct_calls``). If that fails, and where
          the group takes no direct calls, it is ONE Ray call per actor, each answering its
          top-k with their payloads (``search_packed`` without vectors: one in-band pickle each
          way; ``search_hits`` with them: zero-copy arrays).
        * A larger one takes two Ray calls per actor: ``topk``, then ``fetch`` of the winners'
          payloads only. In one round trip each actor builds and sends k payloads per query of
          which the caller keeps k in all; for 1000 queries at k=100 (2 cores, 500k passages) two
          round trips gave 960-1010 instead of 570 queries/s with 2 actors and 1050-1150 instead
          of 350-420 with 4."""
        small = len(xq) * k <= ONE_ROUND_TRIP_MAX_HITS
        if small and self._direct_ready():
            try:
                return self._direct_search_hits(xq, k, params, embeddings)
            except DirectCallError as exc:
                self._direct_failed(exc)
        hits = self._ray_search_hits(xq, k, params, embeddings, small)
        if self._addresses_stale:
            self._refresh_addresses()
        return hits

    def _ray_search_hits(self, xq, k: int, params: SearchParams, embeddings: bool, small: bool) -> Hits:
        handles = self.group.handles
        if small and not embeddings:
            request = pickle.dumps((xq, k, params, embeddings), pickle.HIGHEST_PROTOCOL)
            answers = self.ray.get([h.search_packed.remote(request) for h in handles])
            return merge_hits([pickle.loads(a) for a in answers], k)
        xq_arg = self.ray.put(xq) if xq.nbytes > 100_000 and len(handles) > 1 else xq  # one copy for all
        if small:
            return merge_hits(self.ray.get([h.search_hits.remote(xq_arg, k, params, embeddings) for h in handles]), k)
        parts = self.ray.get([h.topk.remote(xq_arg, k, params) for h in handles])
        return self._winners(parts, k, self._ray_fetch, embeddings)

    def _direct_search_hits(self, xq, k: int, params: SearchParams, embeddings: bool) -> Hits:
        assert self.direct is not None
        actors = list(range(len(self.group.handles)))
        request = DIRECT_TOPK + pickle.dumps((xq, k, params), pickle.HIGHEST_PROTOCOL)
        answers = self.direct.call(self._addresses, actors, [request] * len(actors))
        return self._winners([pickle.loads(a) for a in answers], k, self._direct_fetch, embeddings)

    def _winners(self, parts: list, k: int, fetch: Callable[..., dict[int, tuple]], embeddings: bool) -> Hits:
        """The second round trip of either path: the actors' top-k lists (``ShardServer.topk``) merged
        exactly, then the winners' payloads from the actors that hold them (``fetch(per_actor, embeddings)``)."""
        scores, ids, shards = merge_topk(parts, k)
        fetched = fetch(self._per_actor(requests_of(ids, shards)), embeddings)
        return fill_hits(scores, ids, shards, fetched, embeddings=embeddings, dim=self.group.manifest.encoder.dim)

    def _direct_fetch(self, per_actor: dict[int, dict[int, np.ndarray]], embeddings: bool) -> dict[int, tuple]:
        assert self.direct is not None
        bodies = [DIRECT_FETCH + pickle.dumps((req, embeddings), pickle.HIGHEST_PROTOCOL) for req in per_actor.values()]
        out: dict[int, tuple] = {}
        for answer in self.direct.call(self._addresses, list(per_actor), bodies):
            out.update(pickle.loads(answer))
        return out

    def ping_direct(self) -> None:
        """A direct call that does nothing, to every actor: the direct round trip alone (benchmarks)."""
        if self.direct is None:
            raise RuntimeError(f"shard actors {self.group.name}: no direct calls")
        n = len(self.group.handles)
        self.direct.call(self._addresses, list(range(n)), [DIRECT_PING] * n)

    def _direct_ready(self) -> bool:
        return self.direct is not None and time.monotonic() >= self._direct_retry_at

    def _direct_failed(self, exc: DirectCallError) -> None:
        """The request goes as Ray calls instead. A handler's error (a bad request) changes nothing
        else; a failed connection (actor restarted, node gone, network) sends small requests as Ray
        calls for DIRECT_RETRY_AFTER_S, then asks the actors where they listen now."""
        if exc.remote:
            logger.debug("direct call to shard actors %s failed in the actor: %s", self.group.name, exc)
            return
        if not self._addresses_stale:
            logger.warning("direct calls to shard actors %s failed (%s); Ray calls instead", self.group.name, exc)
        self._direct_retry_at = time.monotonic() + DIRECT_RETRY_AFTER_S
        self._addresses_stale = True

    def _refresh_addresses(self) -> None:
        """After a failed direct call, once a Ray call went through: the actors' current addresses
        (a restarted actor listens on a new port)."""
        try:
            addresses = self.ray.get([h.direct_address.remote() for h in self.group.handles], timeout=30)
        except Exception:  # noqa: BLE001 - an actor still restarting: try again after the next failure's wait
            self._direct_retry_at = time.monotonic() + DIRECT_RETRY_AFTER_S
            return
        self._addresses, self._addresses_stale = list(addresses), False
        # an actor started again without a socket (it could not listen): Ray calls from now on
        self._direct_retry_at = 0.0 if all(a is not None for a in addresses) else float("inf")

    def _per_actor(self, requests: dict[int, np.ndarray]) -> dict[int, dict[int, np.ndarray]]:
        per_actor: dict[int, dict[int, np.ndarray]] = {}
        for s, rows in requests.items():
            per_actor.setdefault(self.group.owner_of[s], {})[s] = rows
        return per_actor

    def fetch(self, requests: dict[int, np.ndarray], embeddings: bool = True):
        """{shard number: row ids} -> {shard number: payloads}, from the actors that hold them
        (direct calls for a small request, as for a search)."""
        per_actor = self._per_actor(requests)
        if sum(len(r) for r in requests.values()) <= ONE_ROUND_TRIP_MAX_HITS and self._direct_ready():
            try:
                return self._direct_fetch(per_actor, embeddings)
            except DirectCallError as exc:
                self._direct_failed(exc)
        return self._ray_fetch(per_actor, embeddings)

    def _ray_fetch(self, per_actor: dict[int, dict[int, np.ndarray]], embeddings: bool) -> dict[int, tuple]:
        out: dict[int, tuple] = {}
        for part in self.ray.get([self.group.handles[a].fetch.remote(req, embeddings) for a, req in per_actor.items()]):
            out.update(part)
        return out

    def close(self, release_shared: bool = False) -> None:
        if self.direct is not None:
            self.direct.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
        elif self.owned or release_shared:
            self.group.close(force=True)


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
