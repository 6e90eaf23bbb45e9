"""One shard searched in this process (``ShardSearcher``: FAISS index + passage table), and the
in-process backend that searches many of them with a thread pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from raggen.index.hits import Hits, fill_hits, merge_topk, requests_of
from raggen.index.passage_blocks import PassageBlocks
from raggen.index.passage_table import embeddings_of, int64_column, one_chunk, take_rows
from raggen.index.preassigned import PreassignedSearch
from raggen.index.search_params import NO_OVERRIDES, SearchParams
from raggen.index.shard import (
    as_float32_matrix,
    deserialize_index,
    reconstruct,
    search,
    set_search_params,
    to_gpu,
)


class ShardSearcher:
    """One shard: a FAISS index plus its passage table; search -> (D, I), fetch(row_ids) -> payload.

    ``index``: an opened FAISS index (``LoadedShard.index()``, used as it is: never copied) or its
    serialized bytes. ``texts`` / ``vectors``: the shard's id/title/text as compressed blocks and
    its stored embeddings (n, d), both memory-mapped (then ``passages`` needs only ``row_id``).
    ``params`` become the index's defaults; ``search`` takes per-call ones that leave the index
    unchanged (safe under concurrent calls)."""

    def __init__(
        self,
        index,
        passages: pa.Table,
        *,
        metric: str,
        params: SearchParams = NO_OVERRIDES,
        use_gpu: bool = False,
        num_threads: int | None = None,
        texts: PassageBlocks | None = None,
        vectors: np.ndarray | None = None,
    ):
        if num_threads:
            faiss.omp_set_num_threads(int(num_threads))
        if not isinstance(index, faiss.Index):
            index = deserialize_index(index)
        set_search_params(index, **params.as_kwargs())
        self.cpu_index = index
        self.index = to_gpu(index) if use_gpu else index
        self.preassigned = PreassignedSearch.of(self.index)  # None: takes no list assignment (GPU, HNSW, OPQ..)
        self.dim = int(index.d)
        self.sign = 1.0 if metric == "ip" else -1.0  # l2 distances -> higher-is-better scores
        row_ids = int64_column(passages, "row_id")
        self._order = np.argsort(row_ids, kind="stable")
        self._sorted_ids = row_ids[self._order]
        self._texts = texts
        if texts is None:
            self._pid = one_chunk(passages.column("id"))
            self._title = one_chunk(passages.column("title"))
            self._text = one_chunk(passages.column("text"))
        self._emb = vectors if vectors is not None else embeddings_of(passages)

    def search(
        self,
        xq: np.ndarray,
        k: int,
        coarse: tuple[np.ndarray, np.ndarray] | None = None,
        params: SearchParams = NO_OVERRIDES,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(b, d), k -> scores (b, k) higher-is-better, row ids (b, k), -1 where no hit.

        ``coarse`` = (Dq, Iq) (b, nprobe): the IVF list assignment computed once for all shards
        that share one coarse quantizer (see ``ivf_quantizer``)."""
        if coarse is not None:
            if self.preassigned is None:
                raise ValueError("a list assignment for a shard that takes none")
            xq = as_float32_matrix(xq, "xq", self.dim)
            D, I = self.preassigned.search(xq, int(k), *coarse, refine_k_factor=params.refine_k_factor)
        else:
            D, I = search(self.index, xq, k, **params.as_kwargs())
        scores = (self.sign * D).astype(np.float32)
        scores[I < 0] = -np.inf
        return scores, I

    def positions(self, row_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._sorted_ids, row_ids)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        if not np.array_equal(self._sorted_ids[pos], row_ids):
            raise KeyError("row id not in this shard's passage table")
        return self._order[pos]

    def fetch(
        self, row_ids: np.ndarray, embeddings: bool = True
    ) -> tuple[list[str], list[str], list[str], np.ndarray | None]:
        """Passage id, title, text and (``embeddings``) the stored vector (n, d) for ``row_ids`` (n,):
        the ``embedding`` column when loaded, else reconstructed from the index."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        if len(row_ids) == 0:
            return [], [], [], np.zeros((0, self.dim), np.float32) if embeddings else None
        pos = self.positions(row_ids)
        emb = None
        if embeddings:
            emb = np.asarray(
                self._emb[pos] if self._emb is not None else reconstruct(self.cpu_index, row_ids), dtype=np.float32
            )
        if self._texts is not None:
            return (*self._texts.take(pos), emb)
        return (
            take_rows(self._pid, pos).to_pylist(),
            take_rows(self._title, pos).to_pylist(),
            take_rows(self._text, pos).to_pylist(),
            emb,
        )

    def ready(self) -> bool:
        return True


@dataclass(frozen=True)
class IvfQuantizer:
    """The coarse quantizer that every shard of a set shares, with the shards' nprobe (their
    default) and a digest of its centroids (equal digests: the same trained quantizer)."""

    quantizer: faiss.Index
    nprobe: int
    digest: str

    @property
    def nlist(self) -> int:
        return int(self.quantizer.ntotal)

    def info(self) -> dict[str, int | str]:
        return {"digest": self.digest, "nprobe": self.nprobe, "nlist": self.nlist,
                "bytes": self.nlist * int(self.quantizer.d) * 4}  # fmt: skip

    def assign(self, xq: np.ndarray, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(Dq, Iq) (b, nprobe): the lists each query probes (``nprobe`` None: the shards' default)."""
        probe = max(1, min(int(nprobe or self.nprobe), self.nlist))
        return self.quantizer.search(xq, probe)

    def check(self, xq: np.ndarray, assignment: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """An assignment made elsewhere (a caller's copy of this quantizer), as FAISS needs it; a
        ValueError unless it has a row per query and only list numbers below nlist (-1: none)."""
        Dq, Iq = (np.ascontiguousarray(a) for a in assignment)
        if Dq.shape != Iq.shape or Iq.ndim != 2 or len(Iq) != len(xq) or Iq.shape[1] < 1:
            raise ValueError(f"list assignment: shapes {Dq.shape} / {Iq.shape} for {len(xq)} queries")
        if Iq.size and (Iq.min() < -1 or Iq.max() >= self.nlist):
            raise ValueError(f"list assignment: list numbers outside -1..{self.nlist - 1}")
        return Dq.astype(np.float32, copy=False), Iq.astype(np.int64, copy=False)


def centroids_digest(quantizer: faiss.Index) -> str:
    """sha256 of a coarse quantizer's centroids: equal for quantizers trained as one."""
    import hashlib

    centroids = quantizer.reconstruct_n(0, quantizer.ntotal)  # (nlist, d)
    return hashlib.sha256(np.ascontiguousarray(centroids).tobytes()).hexdigest()


# re-ranked shards take a list assignment from this quantizer size on (nlist x d x 4 bytes). Their
# candidates are re-scored in numpy (~0.085 ms more a shard per single query at 768-d, k x k_factor
# 40) instead of in FAISS's C++, which only pays when the quantizer search saved costs more: 8 such
# shards, single queries on one thread (benchmarks/refine_assignment.py): IVF64 / IVF256 (192 /
# 768 KiB) 1.47x FAISS's own time at nprobe 8, IVF1024 (3 MiB) 0.74x / 0.94x at nprobe 2 / 128,
# IVF65536 (192 MiB, the 21M recipe) 0.15-0.17x at nprobe 128. Bare IVF shards take one at any size
REFINE_ASSIGN_MIN_QUANTIZER_BYTES = 2 << 20


def ivf_quantizer(searchers: list[ShardSearcher]) -> IvfQuantizer | None:
    """The coarse quantizer, when every shard is an IVF index that takes a list assignment (bare, or
    re-ranked by refine codes with a quantizer of REFINE_ASSIGN_MIN_QUANTIZER_BYTES or more:
    ``preassigned.PreassignedSearch``) over the same trained one (build_index trains once and
    shares) with the same nprobe, else None. Then the list assignment of a query is the same for
    every shard: computed once (here, or by a shard actor's caller) instead of once per shard."""
    if not searchers:
        return None
    digests, nprobes, ivfs = set(), set(), []
    for s in searchers:
        if s.preassigned is None:
            return None  # Flat/HNSW, OPQ in front of the IVF (the transform comes first), a GPU clone
        ivf = s.preassigned.ivf
        if s.preassigned.refine is not None and ivf.nlist * ivf.d * 4 < REFINE_ASSIGN_MIN_QUANTIZER_BYTES:
            return None  # its own quantizer search costs less than re-scoring outside FAISS
        digests.add(centroids_digest(ivf.quantizer))
        nprobes.add(int(ivf.nprobe))
        ivfs.append(ivf)
    if len(digests) != 1 or len(nprobes) != 1:
        return None
    return IvfQuantizer(ivfs[0].quantizer, nprobes.pop(), digests.pop())


class _LocalBackend:
    """Shards in this process, searched concurrently by a thread pool (FAISS releases the GIL).

    Each pool thread gets ``cpus // workers`` OpenMP threads, so shards x OpenMP never
    oversubscribe the cores: latency is about one shard's, not the sum over shards.
    ``search`` returns one (scores, ids) per shard, in shard order (``merge_topk`` merges them);
    ``search_hits`` the merged top-k with its payloads. ``shard_numbers``: the shards' numbers in
    the version (a shard actor serves some of them; default 0..n-1), used in answers and ``fetch``.
    """

    # below this many queries per call, thread hand-off costs more than the shards' search itself
    PARALLEL_MIN_QUERIES = 16

    kind = "local"

    def __init__(
        self,
        searchers: list[ShardSearcher],
        max_workers: int | None = None,
        cpus: int | None = None,
        shard_numbers: list[int] | None = None,
    ):
        import os
        from concurrent.futures import ThreadPoolExecutor

        self.searchers = searchers
        numbers = range(len(searchers)) if shard_numbers is None else shard_numbers
        self.shard_numbers = np.asarray(list(numbers), dtype=np.int64)
        assert len(self.shard_numbers) == len(searchers), "one shard number per searcher"
        self._position = {int(g): i for i, g in enumerate(self.shard_numbers)}  # shard number -> searcher
        self.dim = searchers[0].dim if searchers else 0
        # the shards' shared quantizer (also what a shard actor's callers may assign lists with);
        # used here from 2 shards on, where it saves a quantizer search per further shard
        self.ivf = ivf_quantizer(searchers)
        self.coarse = self.ivf if self.ivf is not None and len(searchers) >= 2 else None
        cpus = cpus or os.cpu_count() or 1  # a shard actor passes its own CPU share, not the node's
        workers = min(len(searchers), max_workers or cpus)
        self.pool = None
        if workers > 1:
            per_thread = max(1, cpus // workers)
            self.pool = ThreadPoolExecutor(
                workers, thread_name_prefix="shard-search", initializer=_set_omp_threads, initargs=(per_thread,)
            )

    def _map(self, fn, items, parallel: bool):
        if parallel and self.pool is not None:
            return list(self.pool.map(fn, items))
        return [fn(item) for item in items]

    def search(self, xq: np.ndarray, k: int, params: SearchParams = NO_OVERRIDES, assignment=None):
        """One (scores, ids) per shard. ``assignment`` (Dq, Iq) (b, nprobe): the lists to probe, made
        by a caller with this backend's quantizer (``self.ivf``); else assigned here."""
        if assignment is not None:
            if self.ivf is None:
                raise ValueError("a list assignment for shards that do not share one IVF quantizer")
            assignment = self.ivf.check(xq, assignment)
        elif self.coarse is not None:
            assignment = self.coarse.assign(xq, params.nprobe)  # (Dq, Iq): (b, nprobe) each
        return self._map(
            lambda s: s.search(xq, k, assignment, params), self.searchers, len(xq) >= self.PARALLEL_MIN_QUERIES
        )

    def topk(self, xq: np.ndarray, k: int, params: SearchParams = NO_OVERRIDES, assignment=None):
        """(b, d), k -> merged scores (b, k), row ids (b, k), shard numbers (b, k) (-1: no hit)."""
        scores, ids, local = merge_topk(self.search(xq, k, params, assignment), k)
        return scores, ids, np.where(local >= 0, self.shard_numbers[np.maximum(local, 0)], -1)

    def search_hits(self, xq: np.ndarray, k: int, params: SearchParams = NO_OVERRIDES, embeddings: bool = True) -> Hits:
        """The merged top-k of (b, d) queries with the hits' payloads (vectors only if ``embeddings``)."""
        scores, ids, shards = self.topk(xq, k, params)
        fetched = self.fetch(requests_of(ids, shards), embeddings)
        return fill_hits(scores, ids, shards, fetched, embeddings=embeddings, dim=self.dim)

    def fetch(self, requests: dict[int, np.ndarray], embeddings: bool = True) -> dict[int, tuple]:
        """{shard number: row ids (n,)} -> {shard number: (ids, titles, texts, vectors (n, d) or None)}."""
        shards = list(requests)
        many = sum(len(r) for r in requests.values()) >= 10 * self.PARALLEL_MIN_QUERIES
        fetch_one = lambda s: self.searchers[self._position[int(s)]].fetch(requests[s], embeddings)  # noqa: E731
        return dict(zip(shards, self._map(fetch_one, shards, many)))

    def close(self, release_shared: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
        self.searchers = []


def _set_omp_threads(n: int) -> None:
    faiss.omp_set_num_threads(n)  # per calling thread (OpenMP's nthreads-var is a per-thread setting)
