"""Search many shards as if they were one index: exact merge of every shard's top-k.

Each shard returns its own top-k; the global top-k is a subset of their union, so sorting the
union (B, S*k) and keeping k reproduces what one index over all passages returns (exactly so for
exact indexes; approximate indexes merge their approximate lists). Every backend answers a query
batch with ``search_hits`` (``raggen.index.hits``): its merged top-k with the hits' payloads, in
ONE call (one round trip per shard actor); ``fetch`` is for hits found elsewhere (e.g. BM25).

Two backends behind the same ``search``:
- in-process (``shard_searcher._LocalBackend``): the shards live in this process (small indexes, tests, one
  serving replica), searched by a thread pool;
- shard actors (``raggen.index.actors.ShardActorGroup``): a group of Ray actors, each serving
  consecutive shards it loaded itself from the store (memory-mapped), placed over the nodes by a
  SPREAD placement group; callers hold only actor handles, never vectors or texts.
Search parameters: the version's ``search_defaults`` (chosen at build time), unless the opener
gives ``nprobe`` / ``ef_search`` / ``refine_k_factor``; ``search(..., nprobe=, ef_search=,
refine_k_factor=)`` overrides them per call.
``ray.init`` is never called here; the caller (entry point, test fixture) owns the cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from raggen.index.hits import Hits, fill_hits, requests_of
from raggen.index.hits import merge_topk as merge_topk  # re-exported: tuning, tests, raggen.index
from raggen.index.loading import LoadedVersion
from raggen.index.manifest import Manifest
from raggen.index.search_params import NO_OVERRIDES, SearchParams
from raggen.index.shard import as_float32_matrix
from raggen.index.shard_searcher import ShardSearcher, _LocalBackend

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """Top-k per query, best first. ``scores`` are higher-is-better: inner products for metric
    'ip', negated squared L2 distances for 'l2'. Missing hits (fewer than k passages) have id ''
    row_id -1, score -inf and a zero embedding (as have all hits when embeddings were not asked for)."""

    ids: list[list[str]]
    row_ids: np.ndarray  # (b, k) int64
    scores: np.ndarray  # (b, k) float32
    titles: list[list[str]]
    texts: list[list[str]]
    embeddings: np.ndarray  # (b, k, d) float32


def resolve_search_params(manifest: Manifest, given: SearchParams = NO_OVERRIDES) -> SearchParams:
    """What the opener gives, else the version's ``search_defaults``, else None (the index's own)."""
    return given.over(SearchParams.of(manifest.search_defaults))


class ShardedIndex:
    """``search(xq[b, d], k) -> SearchResult`` over all shards of a loaded version."""

    def __init__(
        self,
        backend,
        *,
        manifest: Manifest,
        dim: int,
        query_batch_size: int = 256,
        params: SearchParams = NO_OVERRIDES,
    ):
        self._backend = backend
        self.manifest = manifest
        self.dim = dim
        self.query_batch_size = query_batch_size
        self.params = params  # the defaults in force (a None field: the index's own, FAISS's)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def num_passages(self) -> int:
        return self.manifest.num_passages

    @property
    def backend_kind(self) -> str:
        """Where the shards live: "local" (this process) or "actors" (a ShardActorGroup)."""
        return getattr(self._backend, "kind", "local")

    @property
    def actor_group(self):
        """The ShardActorGroup searched through (None in-process)."""
        return getattr(self._backend, "group", None)

    @classmethod
    def from_version(
        cls,
        loaded: LoadedVersion,
        *,
        use_actors: bool = False,
        actor_num_cpus: float = 1.0,
        actor_num_gpus: float = 0.0,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine_k_factor: float | None = None,
        query_batch_size: int = 256,
        max_threads: int | None = None,
    ) -> ShardedIndex:
        """In-process over the loaded shards (``max_threads`` shards searched at once, default: one
        per core), or (``use_actors``) through a new group of shard actors (``SearchSettings``'
        default layout: one per node) that load the version themselves from where ``loaded`` came
        from; ``close()`` ends the group.
        ``nprobe`` / ``ef_search`` / ``refine_k_factor`` default to the manifest's ``search_defaults``."""
        params = resolve_search_params(loaded.manifest, SearchParams(nprobe, ef_search, refine_k_factor))
        if use_actors:
            from raggen.index.actors import ShardActorGroup
            from raggen.index.settings import SearchSettings

            settings = SearchSettings(
                mode="actors",
                actor_num_cpus=actor_num_cpus,
                actor_num_gpus=actor_num_gpus,
                **params.as_kwargs(),
            )
            group = ShardActorGroup.start(
                loaded.uri,
                settings=settings,
                s3_options=loaded.s3_options,
                cache_dir=loaded.cache_dir,
                manifest=loaded.manifest,
            )
            return group.sharded_index(query_batch_size=query_batch_size, owned=True)
        metric = loaded.manifest.metric
        searchers = [ShardSearcher(s.index(), s.passages, metric=metric, params=params, texts=s.texts, vectors=s.vectors)
                     for s in loaded.shards]  # fmt: skip
        backend = _LocalBackend(searchers, max_workers=max_threads)
        return cls(
            backend,
            manifest=loaded.manifest,
            dim=loaded.manifest.encoder.dim,
            query_batch_size=query_batch_size,
            params=params,
        )

    def search(
        self,
        xq: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine_k_factor: float | None = None,
        embeddings: bool = True,
    ) -> SearchResult:
        """Top-k of every query over all shards. ``nprobe`` / ``ef_search`` / ``refine_k_factor``
        override the defaults for this call; ``embeddings=False`` skips the stored vectors (zeros;
        serving needs none)."""
        xq = as_float32_matrix(xq, "xq", self.dim)
        if k <= 0:
            raise ValueError(f"k: must be positive, got {k}")
        params = SearchParams(nprobe, ef_search, refine_k_factor)
        parts = [
            self._result(self._backend.search_hits(xq[i : i + self.query_batch_size], k, params, embeddings))
            for i in range(0, len(xq), self.query_batch_size)
        ]
        if not parts:
            return _empty_result(0, k, self.dim)
        return SearchResult(
            ids=[row for p in parts for row in p.ids],
            row_ids=np.concatenate([p.row_ids for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            titles=[row for p in parts for row in p.titles],
            texts=[row for p in parts for row in p.texts],
            embeddings=np.concatenate([p.embeddings for p in parts]),
        )

    def fetch(
        self, row_ids: np.ndarray, shards: np.ndarray, scores: np.ndarray | None = None, *, embeddings: bool = False
    ) -> SearchResult:
        """The passages of ``row_ids`` (b, k) in shards ``shards`` (b, k) (-1: none) as a
        SearchResult carrying ``scores`` (b, k) (default -inf), e.g. another retriever's hits."""
        row_ids, shards = np.asarray(row_ids, dtype=np.int64), np.asarray(shards, dtype=np.int64)
        assert row_ids.ndim == 2 and shards.shape == row_ids.shape, f"row_ids {row_ids.shape}, shards {shards.shape}"
        scores = np.full(row_ids.shape, -np.inf, np.float32) if scores is None else np.asarray(scores, np.float32)
        return self._fill(scores, row_ids, np.where(row_ids >= 0, shards, -1), embeddings)

    def _fill(self, scores: np.ndarray, row_ids: np.ndarray, shard: np.ndarray, embeddings: bool) -> SearchResult:
        """A SearchResult of (b, k) ``scores`` / ``row_ids`` with their payloads fetched by shard."""
        fetched = self._backend.fetch(requests_of(row_ids, shard), embeddings)
        return self._result(fill_hits(scores, row_ids, shard, fetched, embeddings=embeddings, dim=self.dim))

    def _result(self, hits: Hits) -> SearchResult:
        b, k = hits.row_ids.shape
        emb = hits.embeddings if hits.embeddings is not None else np.zeros((b, k, self.dim), np.float32)
        return SearchResult(ids=hits.ids, row_ids=hits.row_ids, scores=hits.scores, titles=hits.titles,
                            texts=hits.texts, embeddings=emb)  # fmt: skip

    def close(self, *, release_shared: bool = False) -> None:
        """Release what this index holds: its thread pool; the shard actors of a group it owns
        (one it only borrows, e.g. a Train worker's, stays up for its owner unless
        ``release_shared``: the caller knows nobody searches it any more)."""
        self._backend.close(release_shared)


def _empty_result(b: int, k: int, dim: int) -> SearchResult:
    return SearchResult(
        ids=[[""] * k for _ in range(b)],
        row_ids=np.full((b, k), -1, np.int64),
        scores=np.full((b, k), -np.inf, np.float32),
        titles=[[""] * k for _ in range(b)],
        texts=[[""] * k for _ in range(b)],
        embeddings=np.zeros((b, k, dim), np.float32),
    )
