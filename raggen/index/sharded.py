"""Search many shards as if they were one index: exact merge of every shard's top-k.

Each shard returns its own top-k; the global top-k is a subset of their union, so sorting the
union (B, S*k) and keeping k reproduces what one index over all passages returns (exactly so for
exact indexes; approximate indexes merge their approximate lists). Passages for the winners are
fetched in a second step, so only k payloads per query cross process boundaries.

Two backends behind the same ``search``:
- in-process: the shards live in this process (small indexes, tests, one serving replica);
- Ray actors (``use_actors=True``): one ``ShardActor`` per shard with declared ``num_cpus`` (and
  ``num_gpus``), built from ObjectRefs: each shard's serialized bytes and passage table are
  ``ray.put`` ONCE, so actors on a node map the same object-store pages.
``ray.init`` is never called here; the caller (entry point, test fixture) owns the cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raggen.index.manifest import LoadedVersion, Manifest, embeddings_of
from raggen.index.shard import as_float32_matrix, deserialize_index, reconstruct, search, set_search_params, to_gpu

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """Top-k per query, best first. ``scores`` are higher-is-better: inner products for metric
    'ip', negated squared L2 distances for 'l2'. Missing hits (fewer than k passages) have id ''
    row_id -1, score -inf and a zero embedding."""

    ids: list[list[str]]
    row_ids: np.ndarray  # (b, k) int64
    scores: np.ndarray  # (b, k) float32
    titles: list[list[str]]
    texts: list[list[str]]
    embeddings: np.ndarray  # (b, k, d) float32


class ShardSearcher:
    """One shard: a FAISS index plus its passage table; search -> (D, I), fetch(row_ids) -> payload."""

    def __init__(
        self,
        index_bytes: np.ndarray,
        passages: pa.Table,
        *,
        metric: str,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool = False,
        num_threads: int | None = None,
    ):
        import faiss

        if num_threads:
            faiss.omp_set_num_threads(int(num_threads))
        index = deserialize_index(index_bytes)
        set_search_params(index, nprobe=nprobe, ef_search=ef_search)
        self.cpu_index = index
        self.index = to_gpu(index) if use_gpu else index
        self.dim = int(index.d)
        self.sign = 1.0 if metric == "ip" else -1.0  # l2 distances -> higher-is-better scores
        row_ids = passages.column("row_id").to_numpy()
        self._order = np.argsort(row_ids, kind="stable")
        self._sorted_ids = row_ids[self._order]
        self._pid = passages.column("id").combine_chunks()
        self._title = passages.column("title").combine_chunks()
        self._text = passages.column("text").combine_chunks()
        self._emb = embeddings_of(passages)

    def search(self, xq: np.ndarray, k: int, coarse: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(b, d), k -> scores (b, k) higher-is-better, row ids (b, k), -1 where no hit.

        ``coarse`` = (Dq, Iq) (b, nprobe): the IVF list assignment computed once for all shards
        that share one coarse quantizer (see ``shared_quantizer``)."""
        if coarse is not None:
            Dq, Iq = coarse
            D, I = self.index.search_preassigned(as_float32_matrix(xq, "xq", self.dim), int(k), Iq, Dq)
        else:
            D, I = search(self.index, xq, k)
        scores = (self.sign * D).astype(np.float32)
        scores[I < 0] = -np.inf
        return scores, I

    def positions(self, row_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._sorted_ids, row_ids)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        if not np.array_equal(self._sorted_ids[pos], row_ids):
            raise KeyError("row id not in this shard's passage table")
        return self._order[pos]

    def fetch(self, row_ids: np.ndarray) -> tuple[list[str], list[str], list[str], np.ndarray]:
        """Passage id, title, text and embedding (n, d) for ``row_ids`` (n,)."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        if len(row_ids) == 0:
            return [], [], [], np.zeros((0, self.dim), np.float32)
        pos = self.positions(row_ids)
        take = pa.array(pos, type=pa.int64())
        emb = self._emb[pos] if self._emb is not None else reconstruct(self.cpu_index, row_ids)
        return (
            self._pid.take(take).to_pylist(),
            self._title.take(take).to_pylist(),
            self._text.take(take).to_pylist(),
            np.asarray(emb, dtype=np.float32),
        )

    def ready(self) -> bool:
        return True


def shared_quantizer(searchers: list[ShardSearcher]):
    """The coarse quantizer, when every shard is a bare IVF index over the same trained one
    (build_index trains once and shares), else None. Then the list assignment of a query is the
    same for every shard and is computed once instead of once per shard."""
    import hashlib

    import faiss

    if len(searchers) < 2:
        return None
    digests, nprobes = set(), set()
    for s in searchers:
        ivf = faiss.downcast_index(s.index)
        if not isinstance(ivf, faiss.IndexIVF):
            return None  # Flat/HNSW, OPQ in front of the IVF (the transform comes first), a GPU clone
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)  # (nlist, d)
        digests.add(hashlib.sha256(np.ascontiguousarray(centroids).tobytes()).hexdigest())
        nprobes.add(int(ivf.nprobe))
    if len(digests) != 1 or len(nprobes) != 1:
        return None
    ivf0 = faiss.downcast_index(searchers[0].index)
    return ivf0.quantizer, int(ivf0.nprobe)


def merge_topk(per_shard: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[(scores (b, k_s), ids (b, k_s))] -> scores (b, k), ids (b, k), shard (b, k); higher is better.

    Ties keep shard order (stable sort), like a single index that holds the shards back to back.
    """
    scores = np.concatenate([s for s, _ in per_shard], axis=1)  # (b, S*k)
    ids = np.concatenate([i for _, i in per_shard], axis=1)  # (b, S*k)
    shard = np.concatenate([np.full(i.shape, n, dtype=np.int64) for n, (_, i) in enumerate(per_shard)], axis=1)
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


class _LocalBackend:
    """Shards in this process, searched concurrently by a thread pool (FAISS releases the GIL).

    Each pool thread gets ``cpus // workers`` OpenMP threads, so shards x OpenMP never
    oversubscribe the cores: latency is about one shard's, not the sum over shards.
    """

    # below this many queries per call, thread hand-off costs more than the shards' search itself
    PARALLEL_MIN_QUERIES = 16

    def __init__(self, searchers: list[ShardSearcher], max_workers: int | None = None):
        import os
        from concurrent.futures import ThreadPoolExecutor

        self.searchers = searchers
        self.coarse = shared_quantizer(searchers)
        cpus = os.cpu_count() or 1
        workers = min(len(searchers), max_workers or cpus)
        self.pool = None
        if workers > 1:
            per_thread = max(1, cpus // workers)
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="shard-search", initializer=_set_omp_threads, initargs=(per_thread,))

    def _map(self, fn, items, parallel: bool):
        if parallel and self.pool is not None:
            return list(self.pool.map(fn, items))
        return [fn(item) for item in items]

    def search(self, xq: np.ndarray, k: int):
        assignment = None
        if self.coarse is not None:
            quantizer, nprobe = self.coarse
            assignment = quantizer.search(xq, nprobe)  # (Dq, Iq): (b, nprobe) each
        return self._map(lambda s: s.search(xq, k, assignment), self.searchers, len(xq) >= self.PARALLEL_MIN_QUERIES)

    def fetch(self, requests: dict[int, np.ndarray]):
        shards = list(requests)
        many = sum(len(r) for r in requests.values()) >= 10 * self.PARALLEL_MIN_QUERIES
        return dict(zip(shards, self._map(lambda s: self.searchers[s].fetch(requests[s]), shards, many)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
        self.searchers = []


def _set_omp_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(n)  # per calling thread (OpenMP's nthreads-var is a per-thread setting)


class _ActorBackend:
    def __init__(self, actors: list):
        import ray

        self.ray = ray
        self.actors = actors
        ray.get([a.ready.remote() for a in actors])  # surface construction errors now

    def search(self, xq: np.ndarray, k: int):
        xq_ref = self.ray.put(xq)  # one copy for all shards
        return self.ray.get([a.search.remote(xq_ref, k) for a in self.actors])

    def fetch(self, requests: dict[int, np.ndarray]):
        shards = list(requests)
        results = self.ray.get([self.actors[s].fetch.remote(requests[s]) for s in shards])
        return dict(zip(shards, results))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


class ShardedIndex:
    """``search(xq[b, d], k) -> SearchResult`` over all shards of a loaded version."""

    def __init__(self, backend, *, manifest: Manifest, dim: int, query_batch_size: int = 256):
        self._backend = backend
        self.manifest = manifest
        self.dim = dim
        self.query_batch_size = query_batch_size

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def num_passages(self) -> int:
        return self.manifest.num_passages

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
    ) -> "ShardedIndex":
        """In-process (``max_threads`` shards searched at once, default: one per core) or one Ray
        actor per shard (``use_actors``, each with ``actor_num_cpus`` / ``actor_num_gpus``)."""
        metric = loaded.manifest.metric
        kwargs = dict(metric=metric, nprobe=nprobe, ef_search=ef_search)
        if not use_actors:
            searchers = [ShardSearcher(s.index_bytes, s.passages, **kwargs) for s in loaded.shards]
            backend = _LocalBackend(searchers, max_workers=max_threads)
        else:
            backend = _ActorBackend(_start_actors(loaded, actor_num_cpus, actor_num_gpus, kwargs))
        return cls(backend, manifest=loaded.manifest, dim=loaded.manifest.encoder.dim, query_batch_size=query_batch_size)

    def search(self, xq: np.ndarray, k: int) -> SearchResult:
        xq = as_float32_matrix(xq, "xq", self.dim)
        if k <= 0:
            raise ValueError(f"k: must be positive, got {k}")
        parts = [self._search_batch(xq[i : i + self.query_batch_size], k) for i in range(0, len(xq), self.query_batch_size)]
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

    def _search_batch(self, xq: np.ndarray, k: int) -> SearchResult:
        scores, row_ids, shard = merge_topk(self._backend.search(xq, k), k)  # (b, k) each
        b = xq.shape[0]
        requests = {int(s): row_ids[shard == s] for s in np.unique(shard) if s >= 0}
        fetched = self._backend.fetch(requests)
        result = _empty_result(b, k, self.dim)
        result.scores, result.row_ids = scores, row_ids
        for s, (pids, titles, texts, emb) in fetched.items():
            rows, cols = np.nonzero(shard == s)  # same row-major order as row_ids[shard == s]
            result.embeddings[rows, cols] = emb
            for j, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
                result.ids[r][c], result.titles[r][c], result.texts[r][c] = pids[j], titles[j], texts[j]
        return result

    def close(self) -> None:
        """Kill the shard actors (no-op in-process)."""
        self._backend.close()


def _empty_result(b: int, k: int, dim: int) -> SearchResult:
    return SearchResult(
        ids=[[""] * k for _ in range(b)],
        row_ids=np.full((b, k), -1, np.int64),
        scores=np.full((b, k), -np.inf, np.float32),
        titles=[[""] * k for _ in range(b)],
        texts=[[""] * k for _ in range(b)],
        embeddings=np.zeros((b, k, dim), np.float32),
    )


def _start_actors(loaded: LoadedVersion, num_cpus: float, num_gpus: float, kwargs: dict) -> list:
    """One ShardActor per shard; bytes and tables go through the object store once (ray.put)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("ShardedIndex(use_actors=True) needs a running Ray: call ray.init() in the entry point")
    actor_cls = ray.remote(ShardSearcher)
    threads = max(1, int(num_cpus))
    actors = []
    for shard in loaded.shards:
        index_ref = ray.put(shard.index_bytes)
        passages_ref = ray.put(shard.passages)
        actor = actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus or 0).remote(
            index_ref, passages_ref, use_gpu=bool(num_gpus), num_threads=threads, **kwargs
        )
        actors.append(actor)
    return actors


ShardActor = ShardSearcher  # the class each Ray actor runs (wrapped with ray.remote at start-up)
