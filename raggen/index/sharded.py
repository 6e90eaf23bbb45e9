"""Search many shards as if they were one index: exact merge of every shard's top-k.

Each shard returns its own top-k; the global top-k is a subset of their union, so sorting the
union (B, S*k) and keeping k reproduces what one index over all passages returns (exactly so for
exact indexes; approximate indexes merge their approximate lists). Passages for the winners are
fetched in a second step, so only k payloads per query cross process boundaries.

Two backends behind the same ``search``:
- in-process (``shard_searcher._LocalBackend``): the shards live in this process (small indexes, tests, one
  serving replica), searched by a thread pool;
- shard actors (``raggen.index.actors.ShardActorGroup``): a group of Ray actors, each serving
  consecutive shards it loaded itself from the store (memory-mapped), placed over the nodes by a
  SPREAD placement group; callers hold only actor handles, never vectors or texts.
Search parameters: the version's ``search_defaults`` (chosen at build time), unless the opener
gives ``nprobe`` / ``ef_search``; ``search(..., nprobe=, ef_search=)`` overrides them per call.
``ray.init`` is never called here; the caller (entry point, test fixture) owns the cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from raggen.index.loading import LoadedVersion
from raggen.index.manifest import Manifest
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


def merge_topk(per_shard: list[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[(scores (b, k_s), ids (b, k_s)[, shard (b, k_s)])] -> scores (b, k), ids (b, k), shard (b, k);
    higher is better. Without a shard array, part n's hits come from shard n; with one (a shard
    actor's own merge of its shards) its numbers are kept.

    Ties keep part order (stable sort), like a single index that holds the shards back to back.
    """
    scores = np.concatenate([p[0] for p in per_shard], axis=1)  # (b, S*k)
    ids = np.concatenate([p[1] for p in per_shard], axis=1)  # (b, S*k)
    shard = np.concatenate([p[2] if len(p) > 2 else np.full(p[1].shape, n, dtype=np.int64)
                            for n, p in enumerate(per_shard)], axis=1)  # fmt: skip
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (b, k)
    top_ids = np.take_along_axis(ids, order, 1)
    top_shard = np.where(top_ids >= 0, np.take_along_axis(shard, order, 1), -1)  # a shard's "no hit" is no one's
    top = np.take_along_axis(scores, order, 1), top_ids, top_shard
    if top[0].shape[1] < k:  # fewer passages than k in total: pad
        pad = k - top[0].shape[1]
        b = top[0].shape[0]
        top = (
            np.concatenate([top[0], np.full((b, pad), -np.inf, np.float32)], 1),
            np.concatenate([top[1], np.full((b, pad), -1, np.int64)], 1),
            np.concatenate([top[2], np.full((b, pad), -1, np.int64)], 1),
        )
    return top


def resolve_search_params(
    manifest: Manifest, nprobe: int | None, ef_search: int | None
) -> tuple[int | None, int | None]:
    """What the opener gives, else the version's ``search_defaults``, else None (FAISS's own)."""
    defaults = manifest.search_defaults
    if defaults is not None:
        nprobe = defaults.nprobe if nprobe is None else nprobe
        ef_search = defaults.ef_search if ef_search is None else ef_search
    return nprobe, ef_search


class ShardedIndex:
    """``search(xq[b, d], k) -> SearchResult`` over all shards of a loaded version."""

    def __init__(
        self,
        backend,
        *,
        manifest: Manifest,
        dim: int,
        query_batch_size: int = 256,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        self._backend = backend
        self.manifest = manifest
        self.dim = dim
        self.query_batch_size = query_batch_size
        self.nprobe, self.ef_search = nprobe, ef_search  # the defaults in force (None: FAISS's)

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
        query_batch_size: int = 256,
        max_threads: int | None = None,
    ) -> ShardedIndex:
        """In-process over the loaded shards (``max_threads`` shards searched at once, default: one
        per core), or (``use_actors``) through a new group of shard actors, one per shard, that
        load the version themselves from where ``loaded`` came from; ``close()`` ends the group.
        ``nprobe`` / ``ef_search`` default to the manifest's ``search_defaults``."""
        nprobe, ef_search = resolve_search_params(loaded.manifest, nprobe, ef_search)
        if use_actors:
            from raggen.index.actors import ShardActorGroup
            from raggen.index.settings import SearchSettings

            settings = SearchSettings(
                mode="actors",
                actor_num_cpus=actor_num_cpus,
                actor_num_gpus=actor_num_gpus,
                nprobe=nprobe,
                ef_search=ef_search,
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
        searchers = [ShardSearcher(s.index(), s.passages, metric=metric, nprobe=nprobe, ef_search=ef_search)
                     for s in loaded.shards]  # fmt: skip
        backend = _LocalBackend(searchers, max_workers=max_threads)
        return cls(
            backend,
            manifest=loaded.manifest,
            dim=loaded.manifest.encoder.dim,
            query_batch_size=query_batch_size,
            nprobe=nprobe,
            ef_search=ef_search,
        )

    def search(
        self,
        xq: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        embeddings: bool = True,
    ) -> SearchResult:
        """Top-k of every query over all shards. ``nprobe`` / ``ef_search`` override the defaults
        for this call; ``embeddings=False`` skips the stored vectors (zeros; serving needs none)."""
        xq = as_float32_matrix(xq, "xq", self.dim)
        if k <= 0:
            raise ValueError(f"k: must be positive, got {k}")
        kw = {"nprobe": nprobe, "ef_search": ef_search, "embeddings": embeddings}
        parts = [
            self._search_batch(xq[i : i + self.query_batch_size], k, **kw)
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

    def _search_batch(self, xq: np.ndarray, k: int, *, nprobe, ef_search, embeddings: bool) -> SearchResult:
        scores, row_ids, shard = merge_topk(self._backend.search(xq, k, nprobe, ef_search), k)  # (b, k) each
        return self._fill(scores, row_ids, shard, embeddings)

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
        b, k = row_ids.shape
        requests = {int(s): row_ids[shard == s] for s in np.unique(shard) if s >= 0}
        fetched = self._backend.fetch(requests, embeddings)
        result = _empty_result(b, k, self.dim)
        result.scores, result.row_ids = scores, row_ids
        for s, (pids, titles, texts, emb) in fetched.items():
            rows, cols = np.nonzero(shard == s)  # same row-major order as row_ids[shard == s]
            if emb is not None:
                result.embeddings[rows, cols] = emb
            for j, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
                result.ids[r][c], result.titles[r][c], result.texts[r][c] = pids[j], titles[j], texts[j]
        return result

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
