"""Rank fusion against brute force over every document (no index, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from raggen.retrieval.fusion import minmax_normalize, rrf_fuse, weighted_fuse

N = 60  # documents


def ranked(scores: np.ndarray, c: int, drop: float = 0.0, rng=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-c ids (b, c) best first and their scores; ``drop``: fraction of slots with no hit (-1)."""
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :c]
    top = np.take_along_axis(scores, ids, 1).astype(np.float32)
    if drop:
        cut = rng.integers(int(c * (1 - drop)), c + 1, size=len(ids))  # each list ends early
        for q, n in enumerate(cut):
            ids[q, n:], top[q, n:] = -1, -np.inf
    return ids.astype(np.int64), top


def check_against(brute: list[dict[int, float]], ids: np.ndarray, scores: np.ndarray, k: int) -> None:
    for q, full in enumerate(brute):
        want = sorted(full.values(), reverse=True)[:k]
        got = [s for s in scores[q].tolist() if np.isfinite(s)]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for rid, s in zip(ids[q].tolist(), scores[q].tolist()):
            if rid >= 0:
                assert full[rid] == pytest.approx(s, rel=1e-6)
        assert len(set(r for r in ids[q].tolist() if r >= 0)) == len(got)  # no id twice
        assert (ids[q, len(got) :] == -1).all()


@pytest.mark.parametrize(
    "seed, c, k, weights, drop",
    [(0, 20, 10, (1.0, 1.0), 0.0), (1, 30, 5, (0.7, 0.3), 0.3), (2, 5, 10, (0.5, 0.5), 0.5)],
)
def test_rrf_equals_brute_force(seed, c, k, weights, drop):
    rng = np.random.default_rng(seed)
    b, rrf_k = 7, 60.0
    lists = [ranked(rng.standard_normal((b, N)), c, drop, rng)[0] for _ in weights]
    ids, scores = rrf_fuse(lists, k, rrf_k=rrf_k, weights=weights)
    brute = []
    for q in range(b):
        full = {}
        for d in range(N):  # every document: the sum over lists that rank it
            s = sum(w / (rrf_k + list(lst[q]).index(d) + 1) for lst, w in zip(lists, weights) if d in lst[q])
            if s > 0:
                full[d] = s
        brute.append(full)
    check_against(brute, ids, scores, k)


@pytest.mark.parametrize("seed, c, k, w, drop", [(0, 20, 10, 0.5, 0.0), (3, 25, 8, 0.8, 0.4), (4, 3, 6, 0.0, 0.0)])
def test_weighted_equals_brute_force(seed, c, k, w, drop):
    rng = np.random.default_rng(seed)
    b = 6
    pairs = [ranked(rng.standard_normal((b, N)) * scale, c, drop, rng) for scale in (1.0, 7.0)]
    ids, scores = weighted_fuse([p[0] for p in pairs], [p[1] for p in pairs], k, (w, 1 - w))
    brute = []
    for q in range(b):
        full = {}
        for d in range(N):
            s, hit = 0.0, False
            for (lid, lsc), weight in zip(pairs, (w, 1 - w)):
                valid = [float(x) for r, x in zip(lid[q], lsc[q]) if r >= 0]
                if d in lid[q]:
                    x = float(lsc[q][list(lid[q]).index(d)])
                    lo, hi = min(valid), max(valid)
                    s += weight * ((x - lo) / (hi - lo) if hi > lo else 1.0)
                    hit = True
            if hit:
                full[d] = s
        brute.append(full)
    check_against(brute, ids, scores, k)


def test_fusion_edge_cases():
    none = np.full((1, 4), -1, np.int64)
    ids, scores = rrf_fuse([none, none], 3)
    assert (ids == -1).all() and np.isneginf(scores).all()
    one = np.array([[5, 6, -1, -1]])
    ids, scores = rrf_fuse([one, none], 3)
    assert ids.tolist() == [[5, 6, -1]] and scores[0, 0] == pytest.approx(1 / 61)
    # duplicates inside one list count once; ties keep first appearance (the first list's order)
    ids, _ = rrf_fuse([np.array([[1, 1, 2]]), np.array([[2, 3, 1]])], 3, rrf_k=1.0)
    assert ids.tolist() == [[1, 2, 3]]
    a, b = np.array([[7, 8]]), np.array([[8, 7]])
    ids, scores = rrf_fuse([a, b], 2)
    assert ids.tolist() == [[7, 8]] and scores[0, 0] == scores[0, 1]
    norm = minmax_normalize(np.array([[3.0, 3.0, -np.inf], [1.0, 2.0, 4.0]]), np.array([[1, 1, 0], [1, 1, 1]], bool))
    np.testing.assert_allclose(norm, [[1, 1, 0], [0, 1 / 3, 1]])
    ids, scores = weighted_fuse([a, none[:, :2]], [np.array([[2.0, 1.0]]), np.full((1, 2), -np.inf)], 3, (0.5, 0.5))
    assert ids.tolist() == [[7, 8, -1]] and scores[0].tolist()[:2] == [0.5, 0.0]
