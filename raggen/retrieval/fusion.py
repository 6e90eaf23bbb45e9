"""Rank fusion of several ranked lists (dense and sparse retrieval), pure numpy.

Inputs are per-query ranked lists of row ids, best first, ``-1`` where a list has no hit, shapes
``(b, k_i)``; outputs ``(ids (b, k) int64, scores (b, k) float32)`` best first, ``-1`` / ``-inf``
where fewer than k distinct ids were retrieved. Ties are broken by first appearance (list order,
then rank), so results are deterministic.

- Reciprocal rank fusion (Cormack et al., 2009): ``s(d) = sum_i w_i / (rrf_k + rank_i(d))``, rank
  1-based, a list that misses d adds nothing.
- Weighted score fusion: each list's scores min-max normalised per query over its own hits to
  [0, 1] (all equal -> 1), ``s(d) = sum_i w_i * norm_i(d)``, a list that misses d adds 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(ids: Sequence[np.ndarray], weights: Sequence[float] | None) -> tuple[list[np.ndarray], list[float]]:
    ids = [np.asarray(x, dtype=np.int64) for x in ids]
    assert ids and all(x.ndim == 2 for x in ids), "ids: a list of (b, k_i) arrays"
    assert len({x.shape[0] for x in ids}) == 1, f"ids: different batch sizes {[x.shape for x in ids]}"
    weights = [1.0] * len(ids) if weights is None else [float(w) for w in weights]
    assert len(weights) == len(ids), "one weight per list"
    return ids, weights


def _top(fused: list[dict[int, float]], k: int) -> tuple[np.ndarray, np.ndarray]:
    out_ids = np.full((len(fused), k), -1, np.int64)
    out_scores = np.full((len(fused), k), -np.inf, np.float32)
    for q, scores in enumerate(fused):
        # dicts keep insertion order = first appearance: a stable sort keeps it among equal scores
        best = sorted(scores.items(), key=lambda kv: -kv[1])[:k]
        for j, (rid, s) in enumerate(best):
            out_ids[q, j], out_scores[q, j] = rid, s
    return out_ids, out_scores


def rrf_fuse(
    ids: Sequence[np.ndarray], k: int, *, rrf_k: float = 60.0, weights: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of ranked lists ``ids`` [(b, k_i)] -> top-``k`` (ids, scores)."""
    ids, weights = _check(ids, weights)
    assert rrf_k > 0 and k > 0
    fused: list[dict[int, float]] = []
    for q in range(ids[0].shape[0]):
        scores: dict[int, float] = {}
        for lst, w in zip(ids, weights):
            seen = set()
            for rank, rid in enumerate(lst[q].tolist(), start=1):
                if rid < 0 or rid in seen:  # a list names a document once
                    continue
                seen.add(rid)
                scores[rid] = scores.get(rid, 0.0) + w / (rrf_k + rank)
        fused.append(scores)
    return _top(fused, k)


def minmax_normalize(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-row min-max of ``scores`` (b, k) over ``valid`` entries to [0, 1]; a row whose valid
    scores are all equal maps them to 1; invalid entries become 0."""
    scores = np.asarray(scores, dtype=np.float64)
    big = np.where(valid, scores, np.inf).min(axis=1, keepdims=True)  # (b, 1)
    top = np.where(valid, scores, -np.inf).max(axis=1, keepdims=True)
    span = top - big
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(span > 0, (scores - big) / np.where(span > 0, span, 1.0), 1.0)
    return np.where(valid, norm, 0.0)


def weighted_fuse(
    ids: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int, weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sum of per-query min-max normalised scores -> top-``k`` (ids, scores)."""
    ids, weights = _check(ids, weights)
    assert len(scores) == len(ids) and k > 0
    norms = []
    for x, s in zip(ids, scores):
        s = np.asarray(s)
        assert s.shape == x.shape, f"scores {s.shape} vs ids {x.shape}"
        norms.append(minmax_normalize(s, (x >= 0) & np.isfinite(s)))
    fused: list[dict[int, float]] = []
    for q in range(ids[0].shape[0]):
        acc: dict[int, float] = {}
        for lst, norm, w in zip(ids, norms, weights):
            seen = set()
            for rid, v in zip(lst[q].tolist(), norm[q].tolist()):
                if rid < 0 or rid in seen:
                    continue
                seen.add(rid)
                acc[rid] = acc.get(rid, 0.0) + w * v
        fused.append(acc)
    return _top(fused, k)
