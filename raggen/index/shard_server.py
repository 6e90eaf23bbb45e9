"""The shard actor's own side: ``ShardServer`` (what each Ray actor of a ``ShardActorGroup`` runs)
loads its consecutive shards ONCE from the store (sha256 verified, FAISS file memory-mapped, texts
as compressed blocks and stored vectors as ``.npy`` read with ``pread``) and answers ``topk`` /
``fetch`` / ``search_hits`` as Ray calls and, once loaded, the small ones as direct calls over its
own socket (``direct_calls.py``). Also the glibc settings that keep its RSS near its shards' bytes.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections import Counter
from typing import Any

import numpy as np

from raggen.errors import IndexIntegrityError
from raggen.index import direct_messages as messages
from raggen.index.direct_calls import DirectServer
from raggen.index.hits import Hits
from raggen.index.loading import load_version
from raggen.index.search_params import NO_OVERRIDES, SearchParams
from raggen.index.shard import serialize_index
from raggen.index.shard_searcher import ShardSearcher, _LocalBackend

logger = logging.getLogger(__name__)

DIRECT_TOPK, DIRECT_FETCH, DIRECT_PING = b"t", b"f", b"p"  # ops of a shard actor's direct calls (direct_calls.py)


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
        """A direct call (a small request, see ``ActorBackend.search_hits``): ``topk`` or ``fetch``
        (bodies: ``direct_messages``); or a ping (nothing: the round trip alone)."""
        if op == DIRECT_TOPK:
            xq, k, params, assignment = messages.read_topk_request(payload)
            return messages.topk_answer(self._topk(xq, k, params, counter="direct_topk", assignment=assignment))
        if op == DIRECT_FETCH:
            requests, embeddings = messages.read_fetch_request(payload)
            return messages.fetch_answer(self._fetch(requests, embeddings, counter="direct_fetch"))
        if op == DIRECT_PING:
            return b""
        raise ValueError(f"unknown direct call {op!r}")

    def direct_address(self) -> tuple[str, int] | None:
        """Where this actor takes direct calls (None: it does not); a restarted actor has a new one."""
        return self.direct.address if self.direct is not None else None

    def _count(self, method: str, queries: int = 0) -> None:
        with self._count_lock:
            self.calls[method] += 1
            self.queries += queries

    def search_hits(self, xq: np.ndarray, k: int, params: SearchParams = NO_OVERRIDES, embeddings: bool = True) -> Hits:
        """(b, d), k -> this actor's top-k with payloads (k per query, see ``raggen.index.actors``)."""
        self._count("search_hits", len(xq))
        return self.backend.search_hits(xq, k, params, embeddings)

    def search_packed(self, request: bytes) -> bytes:
        """``search_hits`` for a small request: its arguments and its answer each travel as ONE
        in-band pickle (``ActorBackend.search_hits`` sends it). Ray handles every argument, and every
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

    def _topk(self, xq: np.ndarray, k: int, params: SearchParams, *, counter: str, assignment=None):
        """``topk``'s work, for a Ray call or a direct one (each counted under its own name; a call
        whose lists the caller assigned also under "caller_assigned")."""
        self._count(counter, len(xq))
        if assignment is not None:
            self._count("caller_assigned")
        return self.backend.topk(xq, k, params, assignment)

    def coarse_info(self) -> dict[str, Any] | None:
        """What a caller needs to assign IVF lists for this actor (``ActorBackend``): the digest of the
        quantizer all its shards share, their default nprobe, nlist and the quantizer's bytes; None
        when its shards share none (not bare IVF, differently trained, on a GPU)."""
        return self.backend.ivf.info() if self.backend.ivf is not None else None

    def coarse_quantizer(self) -> bytes:
        """That quantizer, serialized (``raggen.index.shard.deserialize_index`` reads it)."""
        if self.backend.ivf is None:
            raise ValueError("these shards share no IVF quantizer")
        return serialize_index(self.backend.ivf.quantizer).tobytes()

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
