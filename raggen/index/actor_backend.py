"""The caller's side of a shard actor group: ``ActorBackend``, the ``ShardedIndex`` backend that
sends query vectors to the actors (direct calls for small requests, Ray calls otherwise or after a
failed direct call), merges their top-k lists exactly and fetches only the winners' payloads.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from raggen.index import direct_messages as messages
from raggen.index.direct_calls import DirectCallError, DirectClient
from raggen.index.hits import Hits, fill_hits, merge_hits, merge_topk, requests_of
from raggen.index.search_params import NO_OVERRIDES, SearchParams
from raggen.index.shard import deserialize_index
from raggen.index.shard_searcher import IvfQuantizer, centroids_digest
from raggen.index.shard_server import DIRECT_FETCH, DIRECT_PING, DIRECT_TOPK

if TYPE_CHECKING:
    from raggen.index.actors import ShardActorGroup

logger = logging.getLogger(__name__)

ONE_ROUND_TRIP_MAX_HITS = 256  # queries x k up to which a request is small (see ActorBackend.search_hits)
DIRECT_RETRY_AFTER_S = 5.0  # after a failed direct call a caller uses Ray calls for this long


class ActorBackend:
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
        self._ivf: IvfQuantizer | None = None  # the actors' shared IVF quantizer, once asked for
        self._ivf_asked = False
        self._ivf_lock = threading.Lock()

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
        self._after_ray_call()
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
        ivf = self.caller_quantizer()
        assignment = ivf.assign(xq, params.nprobe) if ivf is not None and xq.shape[1] == ivf.quantizer.d else None
        request = DIRECT_TOPK + messages.topk_request(xq, k, params, assignment)
        answers = self.direct.call(self._addresses, actors, [request] * len(actors))
        return self._winners([messages.read_topk_answer(a) for a in answers], k, self._direct_fetch, embeddings)

    def _winners(self, parts: list, k: int, fetch: Callable[..., dict[int, tuple]], embeddings: bool) -> Hits:
        """The second round trip of either path: the actors' top-k lists (``ShardServer.topk``) merged
        exactly, then the winners' payloads from the actors that hold them (``fetch(per_actor, embeddings)``)."""
        scores, ids, shards = merge_topk(parts, k)
        fetched = fetch(self._per_actor(requests_of(ids, shards)), embeddings)
        return fill_hits(scores, ids, shards, fetched, embeddings=embeddings, dim=self.group.manifest.encoder.dim)

    def _direct_fetch(self, per_actor: dict[int, dict[int, np.ndarray]], embeddings: bool) -> dict[int, tuple]:
        assert self.direct is not None
        bodies = [DIRECT_FETCH + messages.fetch_request(req, embeddings) for req in per_actor.values()]
        out: dict[int, tuple] = {}
        for answer in self.direct.call(self._addresses, list(per_actor), bodies):
            out.update(messages.read_fetch_answer(answer))
        return out

    def caller_quantizer(self) -> IvfQuantizer | None:
        """The IVF quantizer that all the actors' shards share, copied here on first use, so that a
        small request's lists are assigned once, here, and not once per actor: on 2 cores with 4
        actors of IVF1024,PQ64 shards at nprobe 2 (a 200k copy of the scale rehearsal's index), an
        actor's CPU per single query fell from 1.43-1.49 to 1.12-1.14 ms and the queries/s of 4
        caller threads rose from 320-345 to 372-389 (a single query's p50 alone: within noise). None
        (each actor assigns its own) when the shards share none (not IVF, behind a transform, trained
        apart, on a GPU, re-ranked with a small quantizer: ``shard_searcher.ivf_quantizer``) or it is
        larger than ``index.search.caller_quantizer_max_bytes``, or the actors could not be asked."""
        if not self._ivf_asked:
            with self._ivf_lock:
                if not self._ivf_asked:
                    self._ivf, self._ivf_asked = self._copy_quantizer(), True
        return self._ivf

    def _copy_quantizer(self) -> IvfQuantizer | None:
        handles = self.group.handles
        try:
            infos = self.ray.get([h.coarse_info.remote() for h in handles], timeout=60)
            if any(i is None for i in infos) or len({(i["digest"], i["nprobe"]) for i in infos}) != 1:
                return None
            if infos[0]["bytes"] > self.group.settings.caller_quantizer_max_bytes:
                return None
            blob = self.ray.get(handles[0].coarse_quantizer.remote(), timeout=60)
        except Exception as exc:  # noqa: BLE001 - an actor restarting: it assigns lists itself, as without a copy
            logger.warning(
                "shard actors %s: no copy of their IVF quantizer (%s); each assigns lists", self.group.name, exc
            )
            return None
        quantizer = deserialize_index(blob)
        if centroids_digest(quantizer) != infos[0]["digest"]:
            return None
        return IvfQuantizer(quantizer, int(infos[0]["nprobe"]), infos[0]["digest"])

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

    def _after_ray_call(self) -> None:
        """A Ray call went through (a search's or a fetch's): after a failed direct call, ask the
        actors for their current addresses (a restarted actor listens on a new port)."""
        if self._addresses_stale:
            self._refresh_addresses()

    def _refresh_addresses(self) -> None:
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
        fetched = self._ray_fetch(per_actor, embeddings)
        self._after_ray_call()
        return fetched

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
