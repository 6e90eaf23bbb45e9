"""IVF search over lists assigned elsewhere: the coarse quantizer searched once for many shards
that share it (in one process, or by a shard actor's caller) instead of once per shard.

Two shard shapes take an assignment: a bare IVF index (what ``raggen index build`` writes for
``IVF...,PQ..`` / ``IVF...,Flat``) and an IVF index re-ranked by refine codes behind its id map
(``IndexIDMap2(IndexRefine(IVF, refine codes))``: ``...,RFlat``, ``...,Refine(SQfp16)``). For the
second, FAISS's own ``IndexRefine.search`` would search the quantizer again; here the base IVF is
searched over the given lists for ``k x k_factor`` candidates, which are then re-scored with the
refine index's decoded vectors, as ``IndexRefine`` scores them. An IVF behind a transform (OPQ,
PCA) or a GPU clone takes none: its lists depend on the transformed query.

``PreassignedSearch.of(index)`` takes the index apart once (each SWIG attribute read and downcast
costs microseconds, and a search of a single query in a shard is tens of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import faiss
import numpy as np

RESCORE_CHUNK_BYTES = 16 << 20  # decoded candidate vectors held at once by one search
_WORST_IP = np.float32(-np.finfo(np.float32).max)  # FAISS's distance for a missing hit, per metric
_WORST_L2 = np.float32(np.finfo(np.float32).max)


@dataclass(frozen=True)
class PreassignedSearch:
    """One shard's IVF (and refine stage), ready to search lists assigned elsewhere. Holds views of
    the index's id map and refine codes (read in place, memory-mapped or not): valid while the index
    lives unchanged, as a served shard does."""

    index: faiss.Index  # the shard's index as given (keeps what the views point into alive)
    ivf: faiss.IndexIVF
    refine: faiss.IndexRefine | None
    refine_codes: faiss.Index | None
    # the refine index's flat codes: (ntotal, d) float32 / float16 values, or (ntotal, code_size) bytes
    codes: np.ndarray | None
    id_map: np.ndarray | None  # IDMap's ids by position

    @classmethod
    def of(cls, index: faiss.Index) -> PreassignedSearch | None:
        """For a bare IVF or an IVF re-ranked by a refine index (behind IDMap / IDMap2 or not); else None."""
        outer = inner = faiss.downcast_index(index)
        id_map = None
        if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            id_map = faiss.rev_swig_ptr(inner.id_map.data(), inner.id_map.size())  # a view, no copy
            inner = faiss.downcast_index(inner.index)
        refine = refine_codes = codes = None
        if isinstance(inner, faiss.IndexRefine):
            refine, refine_codes = inner, faiss.downcast_index(inner.refine_index)
            inner = faiss.downcast_index(inner.base_index)
            if isinstance(refine_codes, faiss.IndexFlatCodes) and refine_codes.ntotal:
                codes = _code_view(refine_codes)
        if not isinstance(inner, faiss.IndexIVF):
            return None
        return cls(outer, inner, refine, refine_codes, codes, id_map)

    def search(
        self, xq: np.ndarray, k: int, Dq: np.ndarray, Iq: np.ndarray, refine_k_factor: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(b, d) float32 queries, their lists ``Iq`` (b, nprobe) and distances ``Dq`` -> D (b, k),
        I (b, k) as the index's own search gives them (FAISS's distances, the index's ids, -1 where no
        hit); ``refine_k_factor`` None: the refine index's own."""
        if self.refine is None:
            D, I = ivf_search_preassigned(self.ivf, xq, k, Dq, Iq)
        else:
            k_factor = float(self.refine.k_factor if refine_k_factor is None else refine_k_factor)
            k_base = max(k, int(k * k_factor))
            # the candidates' vectors are decoded a few queries at a time (a batch of 1000 queries at
            # k=100 and k_factor 16 would otherwise decode 4.9 GB at 768-d)
            step = max(1, RESCORE_CHUNK_BYTES // (k_base * self.ivf.d * 4))
            parts = []
            for a in range(0, len(xq), step):
                q = xq[a : a + step]
                _, candidates = ivf_search_preassigned(self.ivf, q, k_base, Dq[a : a + step], Iq[a : a + step])
                parts.append(rescore(self._decode(candidates), q, candidates, k, self.ivf.metric_type))
            D, I = parts[0] if len(parts) == 1 else (np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts]))
        if self.id_map is not None:
            I = np.where(I >= 0, self.id_map[np.maximum(I, 0)], -1)
        return D, I

    def _decode(self, candidates: np.ndarray) -> np.ndarray:
        """(b, m, d) float32 refine vectors of ``candidates`` (b, m) (-1: any row, masked later)."""
        labels = np.maximum(candidates, 0).ravel()
        if self.codes is not None and self.codes.dtype != np.uint8:  # fp32 / fp16 values: read as they are
            vectors = self.codes[labels].astype(np.float32, copy=False)
        elif self.codes is not None:  # other flat codes (SQ8, ...): one decode call
            vectors = self.refine_codes.sa_decode(self.codes[labels])
        else:
            vectors = self.refine_codes.reconstruct_batch(labels)
        return vectors.reshape(*candidates.shape, -1)


def _code_view(flat: faiss.IndexFlatCodes) -> np.ndarray:
    """A flat-codes index's codes in place: fp32 vectors (IndexFlat), fp16 ones (SQfp16, IEEE half
    as numpy's float16: converting them is ~5x faster than FAISS's per-element decode), else bytes."""
    raw = faiss.rev_swig_ptr(flat.codes.data(), flat.codes.size()).reshape(-1, flat.code_size)
    if isinstance(flat, faiss.IndexFlat):
        return raw.view(np.float32)
    if isinstance(flat, faiss.IndexScalarQuantizer) and flat.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        return raw.view(np.float16)
    return raw


def preassignable_ivf(index: faiss.Index):
    """The IndexIVF whose lists an assignment names (``PreassignedSearch.of``), or None."""
    plan = PreassignedSearch.of(index)
    return None if plan is None else plan.ivf


def search_preassigned(
    index: faiss.Index, xq: np.ndarray, k: int, Dq: np.ndarray, Iq: np.ndarray, refine_k_factor: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``PreassignedSearch.of(index).search(...)`` for a single call (a ValueError if the index takes none)."""
    plan = PreassignedSearch.of(index)
    if plan is None:
        raise ValueError(f"{type(faiss.downcast_index(index)).__name__}: takes no IVF list assignment")
    return plan.search(xq, k, Dq, Iq, refine_k_factor)


@lru_cache(maxsize=64)
def _ivf_params(nprobe: int) -> faiss.SearchParametersIVF:
    return faiss.SearchParametersIVF(nprobe=nprobe)  # read-only during a search: shared by threads


def ivf_search_preassigned(
    ivf: faiss.IndexIVF, xq: np.ndarray, k: int, Dq: np.ndarray, Iq: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's IVF search over the lists ``Iq`` (b, nprobe) given for each query; nprobe per call
    (the Python wrapper takes neither per-call params nor an nprobe other than the index's)."""
    n = xq.shape[0]
    D, I = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    Iq, Dq = np.ascontiguousarray(Iq, dtype=np.int64), np.ascontiguousarray(Dq, dtype=np.float32)
    ivf.search_preassigned_c(n, faiss.swig_ptr(xq), k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq), faiss.swig_ptr(D),
                             faiss.swig_ptr(I), False, _ivf_params(int(Iq.shape[1])))  # fmt: skip
    return D, I


def rescore(
    vectors: np.ndarray, xq: np.ndarray, candidates: np.ndarray, k: int, metric: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's ``candidates`` (b, m; -1: none) by the distance of their
    ``vectors`` (b, m, d) to the query: inner product (higher first) or squared L2 (lower first), ties
    in candidate order; padded with FAISS's fill (-1) where fewer than ``k`` are valid."""
    b, m = candidates.shape
    valid = candidates >= 0
    if metric == faiss.METRIC_INNER_PRODUCT:
        dist = np.matmul(vectors, xq[:, :, None])[:, :, 0]
        worst, key = _WORST_IP, -dist
    else:
        diff = vectors - xq[:, None, :]
        dist = np.einsum("bmd,bmd->bm", diff, diff)
        worst, key = _WORST_L2, dist.copy()
    key[~valid] = np.inf
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    rows = np.arange(b)[:, None]
    found = valid[rows, order]
    D = np.where(found, dist[rows, order], worst).astype(np.float32, copy=False)
    I = np.where(found, candidates[rows, order], -1)
    if m < k:
        D = np.hstack([D, np.full((b, k - m), worst, np.float32)])
        I = np.hstack([I, np.full((b, k - m), -1, np.int64)])
    return D, I
