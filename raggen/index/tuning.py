"""Search defaults from a recall target: the smallest IVF ``nprobe`` / HNSW ``efSearch`` that gets
within ``1 - target_recall`` of the index's exhaustive setting, on held-out queries.

FAISS searches IVF indexes at nprobe 1 and HNSW at efSearch 16 unless told otherwise, which loses
much of the recall (MiniLM, 10k passages, IVF100,PQ32: answer recall@5 0.770 vs Flat's 0.963).
At build time (``build_index``):

1. ``xq``: ``num_queries`` stored vectors sampled from the corpus (shard 0's are a uniform sample:
   shards split the corpus by a hash of the passage id), slightly perturbed so a query is not
   exactly one of the indexed vectors;
2. per shard (in its build task): the exact top-k by a Flat search over the shard's vectors, and
   the index's top-k at every value of the ladder (powers of 2; IVF up to nlist, which scans every
   list; HNSW up to ``MAX_EF_SEARCH``), via ``shard_stats``;
3. the shards' lists are merged exactly (``merge_topk``) and recall@k of each value is measured
   against the exact top-k; ``choose`` takes the smallest value whose recall is at least
   ``max_recall - (1 - target_recall)``, ``max_recall`` being the recall of the last (exhaustive)
   value: the compression (PQ) loses what no nprobe recovers, so the target is what probing more
   lists can still win.

numpy in, numpy out (faiss/contrib style); no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from raggen.index.manifest import SearchDefaults
from raggen.index.shard import (
    as_float32_matrix,
    faiss_metric,
    hnsw_of,
    ivf_of,
    normalize_metric,
    search,
)
from raggen.index.sharded import merge_topk

MAX_EF_SEARCH = 1024
MIN_EF_SEARCH = 16


def ladder(index: faiss.Index) -> tuple[str, list[int]] | None:
    """("nprobe", [1, 2, 4, ..., nlist]) for IVF, ("ef_search", [16, ..., 1024]) for HNSW, None
    when the type has no such knob (Flat: exact already)."""
    ivf = ivf_of(index)
    if ivf is not None:
        nlist = int(ivf.nlist)
        values = [1 << i for i in range(nlist.bit_length()) if (1 << i) < nlist]
        return "nprobe", values + [nlist]
    if hnsw_of(index) is not None:
        values, v = [], MIN_EF_SEARCH
        while v <= MAX_EF_SEARCH:
            values.append(v)
            v *= 2
        return "ef_search", values
    return None


def sample_queries(xb: np.ndarray, num: int, *, seed: int = 0, perturb: float = 0.1) -> np.ndarray:
    """``num`` rows of ``xb`` (n, d) drawn without replacement, plus Gaussian noise of ``perturb``
    times each row's RMS coordinate (0: the stored vectors themselves) -> (num, d) float32."""
    xb = as_float32_matrix(xb, "xb")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(xb), size=min(int(num), len(xb)), replace=False)
    xq = xb[np.sort(rows)].copy()
    if perturb:
        rms = np.sqrt((xq**2).mean(axis=1, keepdims=True))  # (num, 1)
        xq += (perturb * rms * rng.standard_normal(xq.shape)).astype(np.float32)
    return np.ascontiguousarray(xq, dtype=np.float32)


def exact_topk(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth by a Flat search: scores (b, k) higher-is-better, ids (b, k) (-1: no hit)."""
    xb, xq = as_float32_matrix(xb, "xb"), as_float32_matrix(xq, "xq", xb.shape[1])
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    assert ids.shape == (len(xb),), f"ids: expected ({len(xb)},), got {ids.shape}"
    flat = faiss.IndexFlat(xb.shape[1], faiss_metric(metric))
    flat.add(xb)
    D, I = flat.search(xq, int(k))
    return _as_scores(D, I, metric), np.where(I >= 0, ids[np.maximum(I, 0)], -1)


def _as_scores(D: np.ndarray, I: np.ndarray, metric: str) -> np.ndarray:
    scores = (D if normalize_metric(metric) == "ip" else -D).astype(np.float32)
    scores[I < 0] = -np.inf
    return scores


@dataclass
class ShardStats:
    """One shard's part of the tuning: exact top-k and the index's top-k per ladder value."""

    param: str | None  # "nprobe" | "ef_search" | None (nothing to tune)
    values: list[int]
    exact: tuple[np.ndarray, np.ndarray]  # scores (b, k), ids (b, k)
    approx: list[tuple[np.ndarray, np.ndarray]]  # one (scores, ids) per value


def shard_stats(
    index: faiss.Index, xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, *, k: int, metric: str
) -> ShardStats:
    """What one shard contributes (computed where the shard is built: its vectors are there)."""
    exact = exact_topk(xb, ids, xq, k, metric)
    knob = ladder(index)
    if knob is None:
        return ShardStats(None, [], exact, [])
    param, values = knob
    approx = []
    for v in values:
        D, I = search(index, xq, k, **{param: v})
        approx.append((_as_scores(D, I, metric), I))
    return ShardStats(param, values, exact, approx)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids; -1 entries are no hit)."""
    per_query = []
    for f, t in zip(found, truth):
        t = set(t[t >= 0].tolist())
        if t:
            per_query.append(len(t & set(f[f >= 0].tolist())) / len(t))
    return float(np.mean(per_query)) if per_query else 1.0


def choose(values: list[int], recalls: list[float], target_recall: float) -> tuple[int, float, float]:
    """(value, its recall, the exhaustive value's recall): the smallest value whose recall is at
    least ``recalls[-1] - (1 - target_recall)``."""
    assert len(values) == len(recalls) and values, "one recall per value"
    ceiling = recalls[-1]
    need = ceiling - (1.0 - target_recall) - 1e-9
    for v, r in zip(values, recalls):
        if r >= need:
            return v, r, ceiling
    return values[-1], recalls[-1], ceiling


def combine(stats: list[ShardStats], *, k: int, target_recall: float) -> SearchDefaults | None:
    """The version's search defaults from every shard's stats (None: nothing to tune)."""
    params = {s.param for s in stats}
    if params == {None}:
        return None
    if len(params) != 1 or len({tuple(s.values) for s in stats}) != 1:
        raise ValueError("shards differ in index type or ladder: cannot tune them together")
    first = stats[0]
    _, truth, _ = merge_topk([s.exact for s in stats], k)
    recalls = []
    for j in range(len(first.values)):
        _, found, _ = merge_topk([s.approx[j] for s in stats], k)
        recalls.append(recall_at_k(found, truth))
    value, recall, ceiling = choose(first.values, recalls, target_recall)
    return SearchDefaults(
        **{first.param: value},
        recall=round(recall, 4),
        max_recall=round(ceiling, 4),
        target_recall=target_recall,
        k=k,
        num_queries=int(first.exact[1].shape[0]),
    )


def tune(
    indexes: list[faiss.Index],
    xbs: list[np.ndarray],
    ids: list[np.ndarray],
    xq: np.ndarray,
    *,
    metric: str,
    k: int = 100,
    target_recall: float = 0.99,
) -> SearchDefaults | None:
    """All shards in one process (tests, small indexes): ``combine`` of every ``shard_stats``."""
    stats = [shard_stats(ix, xb, i, xq, k=k, metric=metric) for ix, xb, i in zip(indexes, xbs, ids)]
    return combine(stats, k=k, target_recall=target_recall)
