"""Search defaults from a recall target: the smallest IVF ``nprobe`` / HNSW ``efSearch`` (and, for
a re-ranked index, ``refine_k_factor``) that gets within ``1 - target_recall`` of the index's
exhaustive setting, on held-out queries.

FAISS searches IVF indexes at nprobe 1 and HNSW at efSearch 16 unless told otherwise, which loses
much of the recall (MiniLM, 10k passages, IVF100,PQ32: answer recall@5 0.770 vs Flat's 0.963).
At build time (``build_index``):

1. ``xq``: ``num_queries`` stored vectors sampled from the corpus (shard 0's are a uniform sample:
   shards split the corpus by a hash of the passage id), each moved by noise to cosine
   ``tune_query_similarity`` (0.6) from its source, about as far as a real question is from its
   best passage (:data:`QUERY_SIMILARITY`);
2. per shard (in its build task): the exact top-k by a Flat search over the shard's vectors, and
   the index's top-k at every value of the ladder (powers of 2; IVF up to nlist, which scans every
   list; HNSW up to ``MAX_EF_SEARCH``), via ``shard_stats``;
3. the shards' lists are merged exactly (``merge_topk``) and recall@k of each value is measured
   against the exact top-k; ``choose`` takes the smallest value whose recall is at least
   ``max_recall - (1 - target_recall)``, ``max_recall`` being the recall of the last (exhaustive)
   value: the compression (PQ) loses what no nprobe recovers, so the target is what probing more
   lists can still win.

Re-ranked indexes (``IVF1024,PQ64,RFlat``, ``...,Refine(SQ8)``): the PQ search returns k x
k_factor candidates that the refine codes re-score; FAISS's default k_factor 1 re-scores only the
k PQ hits, so re-ranking changes their order but recovers none that PQ missed. Here every ladder
value is measured at every k_factor of ``K_FACTORS`` (1, 2, 4, ..., 64; ``len(K_FACTORS)`` times
the searches of a plain index, at build time only). nprobe is chosen as above at the most generous
k_factor (64: what probing can win once re-ranking keeps nearly every true neighbour), then the
smallest k_factor whose recall at that nprobe still reaches the same bound
``max_recall - (1 - target_recall)``, ``max_recall`` being the recall at (exhaustive nprobe,
k_factor 64). Both choices answer to one bound, so the pair is within the target of the most
exhaustive setting, not twice it. A refine index without an nprobe/efSearch knob ("PQ16,RFlat")
tunes its k_factor alone. The choice is recorded as ``search_defaults.refine_k_factor``.

numpy in, numpy out (faiss/contrib style); no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from raggen.index.manifest import SearchDefaults
from raggen.index.settings import QUERY_SIMILARITY
from raggen.index.shard import (
    as_float32_matrix,
    faiss_metric,
    hnsw_of,
    ivf_of,
    normalize_metric,
    refine_of,
    search,
)
from raggen.index.sharded import merge_topk

MAX_EF_SEARCH = 1024
MIN_EF_SEARCH = 16
K_FACTORS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]  # re-ranked indexes: candidates re-scored per hit


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


def query_noise(similarity: float) -> float:
    """The Gaussian noise scale (times a row's RMS coordinate) that puts a perturbed row at cosine
    ``similarity`` from the row, in high dimension: noise of norm r|x| gives cos = 1 / sqrt(1 + r^2)."""
    if not 0 < similarity <= 1:
        raise ValueError(f"similarity must be in (0, 1], got {similarity}")
    return float(np.sqrt(1.0 / similarity**2 - 1.0))


def sample_queries(xb: np.ndarray, num: int, *, seed: int = 0, similarity: float = QUERY_SIMILARITY) -> np.ndarray:
    """``num`` rows of ``xb`` (n, d) drawn without replacement, each plus Gaussian noise that puts it
    at cosine ``similarity`` from the row (1.0: the stored vectors themselves) -> (num, d) float32."""
    xb = as_float32_matrix(xb, "xb")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(xb), size=min(int(num), len(xb)), replace=False)
    xq = xb[np.sort(rows)].copy()
    noise = query_noise(similarity)
    if noise:
        rms = np.sqrt((xq**2).mean(axis=1, keepdims=True))  # (num, 1)
        xq += (noise * rms * rng.standard_normal(xq.shape)).astype(np.float32)
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
    """One shard's part of the tuning: exact top-k and the index's top-k per ladder value (and,
    for a re-ranked index, per k_factor)."""

    param: str | None  # "nprobe" | "ef_search" | None (no such knob: nothing, or only k_factor, to tune)
    values: list[int | None]  # the ladder; [None] for a refine index without a knob
    exact: tuple[np.ndarray, np.ndarray]  # scores (b, k), ids (b, k)
    approx: list[tuple[np.ndarray, np.ndarray]]  # one (scores, ids) per value (refine: at the largest k_factor)
    k_factors: list[float] = field(default_factory=list)  # refine indexes: K_FACTORS, else []
    refined: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)  # [value][k_factor]


def shard_stats(
    index: faiss.Index, xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, *, k: int, metric: str
) -> ShardStats:
    """What one shard contributes (computed where the shard is built: its vectors are there)."""
    exact = exact_topk(xb, ids, xq, k, metric)
    knob = ladder(index)
    k_factors = list(K_FACTORS) if refine_of(index) is not None else []
    if knob is None and not k_factors:
        return ShardStats(None, [], exact, [])
    param, values = knob if knob is not None else (None, [None])

    def measure(**params) -> tuple[np.ndarray, np.ndarray]:
        D, I = search(index, xq, k, **params)
        return _as_scores(D, I, metric), I

    grid = [[measure(**({param: v} if param else {}), refine_k_factor=f) for f in k_factors or [None]] for v in values]
    return ShardStats(param, values, exact, [row[-1] for row in grid], k_factors, grid if k_factors else [])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids; -1 entries are no hit)."""
    per_query = []
    for f, t in zip(found, truth):
        t = set(t[t >= 0].tolist())
        if t:
            per_query.append(len(t & set(f[f >= 0].tolist())) / len(t))
    return float(np.mean(per_query)) if per_query else 1.0


def choose(values: list, recalls: list[float], target_recall: float, ceiling: float | None = None) -> tuple:
    """(value, its recall, the ceiling): the smallest value whose recall is at least
    ``ceiling - (1 - target_recall)``; ``ceiling`` defaults to the last (exhaustive) value's recall."""
    assert len(values) == len(recalls) and values, "one recall per value"
    ceiling = recalls[-1] if ceiling is None else ceiling
    need = ceiling - (1.0 - target_recall) - 1e-9
    for v, r in zip(values, recalls):
        if r >= need:
            return v, r, ceiling
    return values[-1], recalls[-1], ceiling


def combine(stats: list[ShardStats], *, k: int, target_recall: float) -> SearchDefaults | None:
    """The version's search defaults from every shard's stats (None: nothing to tune)."""
    first = stats[0]
    if first.param is None and not first.k_factors:
        return None
    same = {(s.param, tuple(s.values), tuple(s.k_factors)) for s in stats}
    if len(same) != 1:
        raise ValueError("shards differ in index type or ladder: cannot tune them together")
    _, truth, _ = merge_topk([s.exact for s in stats], k)

    def merged_recall(parts: list[tuple[np.ndarray, np.ndarray]]) -> float:
        return recall_at_k(merge_topk(parts, k)[1], truth)

    recalls = [merged_recall([s.approx[j] for s in stats]) for j in range(len(first.values))]
    value, recall, ceiling = choose(first.values, recalls, target_recall)
    k_factor = None
    if first.k_factors:  # at the chosen value, the smallest k_factor within the same bound
        j = first.values.index(value)
        by_factor = [merged_recall([s.refined[j][f] for s in stats]) for f in range(len(first.k_factors))]
        k_factor, recall, _ = choose(first.k_factors, by_factor, target_recall, ceiling=ceiling)
    return SearchDefaults(
        **({first.param: value} if first.param else {}),
        refine_k_factor=k_factor,
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
