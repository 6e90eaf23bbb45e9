"""One FAISS shard: build per factory type, search vs brute force, serialize round trip, errors."""

from __future__ import annotations

import numpy as np
import pytest

from raggen.errors import ConfigError
from raggen.index import shard as S
from raggen.index.sharded import merge_topk

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def clustered(n: int, d: int, seed: int = 0, centers: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 3
    return (c[rng.integers(0, centers, n)] + rng.standard_normal((n, d))).astype(np.float32)


def brute_force(xq: np.ndarray, xb: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Positions of the exact top-k rows of xb per query (numpy only)."""
    if metric == "ip":
        scores = xq @ xb.T  # (q, n)
    else:
        scores = -((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1)  # (q, n)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found_ids, true_ids)]))


# (factory, n, d, train_sample, recall@10 it must reach at nprobe=all / efSearch=128)
FACTORIES = [
    ("Flat", 500, 16, 500, 1.0),
    ("HNSW16", 500, 16, 500, 0.9),
    ("IVF8,Flat", 500, 16, 500, 1.0),  # nprobe = nlist: exhaustive, hence exact
    ("IVF8,PQ4", 600, 16, 600, 0.3),
    ("OPQ4,IVF8,PQ4", 600, 16, 600, 0.3),
    ("IVF8,PQ4,RFlat", 600, 16, 600, 0.3),  # PQ candidates re-scored exactly (IDMap2 holds the ids)
    ("IVF8,PQ4,Refine(SQ8)", 600, 16, 600, 0.3),
]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("factory,n,d,train_sample,min_recall", FACTORIES)
def test_build_search_serialize(factory, n, d, train_sample, min_recall, metric):
    xb = clustered(n, d)
    xq = clustered(7, d, seed=1)
    ids = np.random.default_rng(2).permutation(10**6)[:n].astype(np.int64)  # arbitrary, unique
    index = S.build_shard_index(xb, ids, factory=factory, metric=metric, train_sample=train_sample)
    S.set_search_params(index, nprobe=8, ef_search=128)
    assert index.ntotal == n and index.d == d

    D, I = S.search(index, xq, 10)
    assert D.shape == (7, 10) and I.shape == (7, 10) and I.dtype == np.int64
    assert np.isin(I, ids).all()
    truth = ids[brute_force(xq, xb, 10, metric)]
    assert recall(I, truth) >= min_recall
    if min_recall == 1.0:
        assert (I == truth).all()
        exact = (xq @ xb.T) if metric == "ip" else ((xq[:, None] - xb[None]) ** 2).sum(-1)
        pos = {int(v): j for j, v in enumerate(ids)}
        expected = np.take_along_axis(exact, np.vectorize(pos.get)(I), 1)
        np.testing.assert_allclose(D, expected, rtol=1e-4, atol=1e-3)

    data = S.serialize_index(index)
    assert data.dtype == np.uint8
    again = S.deserialize_index(data.tobytes())
    S.set_search_params(again, nprobe=8, ef_search=128)
    D2, I2 = S.search(again, xq, 10)
    assert (I2 == I).all()
    np.testing.assert_allclose(D2, D, rtol=1e-6)


@pytest.mark.parametrize(
    "factory,exact",
    [("Flat", True), ("HNSW16", True), ("IVF8,Flat", True), ("IVF8,PQ4", False), ("IVF8,PQ4,RFlat", True)],
)
def test_reconstruct_by_row_id(factory, exact):
    xb = clustered(600, 16)
    ids = np.arange(600, dtype=np.int64) * 7 + (3 << 40)  # shard-3 style ids
    index = S.deserialize_index(S.serialize_index(S.build_shard_index(xb, ids, factory=factory, train_sample=600)))
    pick = np.array([5, 0, 599, 42])
    got = S.reconstruct(index, ids[pick])
    assert got.shape == (4, 16)
    if exact:
        np.testing.assert_array_equal(got, xb[pick])
    else:  # PQ codes decode to an approximation: closer to the right vector than to others
        err = np.linalg.norm(got - xb[pick], axis=1)
        other = np.linalg.norm(got - xb[pick[::-1]], axis=1)
        assert (err < other).all()


def test_bad_factory_string_is_a_config_error():
    with pytest.raises(ConfigError, match="faiss_factory.*'NotAnIndex'"):
        S.new_index(16, "NotAnIndex")
    with pytest.raises(ConfigError, match="faiss_factory.*'IVF8,PQ5'"):
        S.new_index(16, "IVF8,PQ5")  # 16 is not a multiple of 5


def test_too_few_training_vectors_names_the_need():
    xb = clustered(100, 16)
    with pytest.raises(ConfigError, match="needs at least 256 training vectors, got 100"):
        S.build_shard_index(xb, np.arange(100), factory="IVF8,PQ4")
    with pytest.raises(ConfigError, match="needs at least 64 training vectors, got 50"):
        S.build_shard_index(xb, np.arange(100), factory="IVF64,Flat", train_sample=50)


def test_metric_and_shape_checks():
    assert S.normalize_metric("Inner_Product") == "ip" and S.normalize_metric("L2") == "l2"
    with pytest.raises(ConfigError, match="metric"):
        S.normalize_metric("cosine")
    index = S.build_shard_index(clustered(50, 8), np.arange(50), factory="Flat")
    with pytest.raises(ValueError, match="xq: expected dimension 8, got 9"):
        S.search(index, np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError, match="xq: expected a 2-D array"):
        S.search(index, np.zeros(8, np.float32), 3)
    with pytest.raises(ValueError, match="unique"):
        S.build_shard_index(clustered(4, 8), np.array([1, 1, 2, 3]), factory="Flat")


def test_more_k_than_vectors_pads_with_minus_one():
    index = S.build_shard_index(clustered(3, 8), np.array([10, 11, 12]), factory="Flat")
    D, I = S.search(index, clustered(2, 8, seed=5), 5)
    assert (I[:, 3:] == -1).all() and set(I[:, :3].ravel().tolist()) == {10, 11, 12}


def test_merge_topk_matches_sorting_the_union():
    rng = np.random.default_rng(0)
    b, k = 4, 6
    parts = []
    for s in range(3):
        scores = np.sort(rng.standard_normal((b, k)).astype(np.float32), axis=1)[:, ::-1].copy()
        parts.append((scores, rng.integers(0, 1000, (b, k)) + s * 10_000))
    top_s, top_i, top_shard = merge_topk(parts, k)
    for q in range(b):  # brute force: all (score, id, shard) triples, sorted
        union = sorted(
            ((float(p[0][q, j]), int(p[1][q, j]), s) for s, p in enumerate(parts) for j in range(k)),
            key=lambda t: -t[0],
        )[:k]
        assert top_s[q].tolist() == pytest.approx([u[0] for u in union])
        assert top_i[q].tolist() == [u[1] for u in union]
        assert top_shard[q].tolist() == [u[2] for u in union]
    padded_s, padded_i, _ = merge_topk([(parts[0][0][:, :2], parts[0][1][:, :2])], 5)
    assert (padded_i[:, 2:] == -1).all() and np.isneginf(padded_s[:, 2:]).all()


def test_shards_sharing_one_trained_quantizer_merge_to_the_exact_answer():
    """IVF shards built from one trained index (``trained_index``), searched with nprobe = nlist,
    merge to exactly what one Flat index over all vectors returns."""
    xb, xq = clustered(900, 16), clustered(6, 16, seed=3)
    trained = S.train_index(xb, factory="IVF8,Flat", train_sample=900)
    parts = np.array_split(np.arange(900), 3)
    results = []
    for rows in parts:
        index = S.build_shard_index(xb[rows], rows.astype(np.int64), trained_index=trained)
        assert index.ntotal == len(rows)
        S.set_search_params(index, nprobe=8)
        results.append(S.search(index, xq, 5))
    _, merged_ids, _ = merge_topk(results, 5)
    assert trained.ntotal == 0  # cloned, never filled
    assert (merged_ids == brute_force(xq, xb, 5, "ip")).all()


def test_a_refine_index_takes_nprobe_and_its_k_factor_re_ranks_more_candidates():
    """IVF-PQ + exact re-ranking: nprobe reaches the base IVF through the refine wrapper, and with
    k_factor 8 (re-score 8k PQ candidates) the top-10 is (nearly) the exact one where plain PQ's is not."""
    import faiss

    xb, xq = clustered(2000, 16), clustered(20, 16, seed=1)
    ids = np.arange(2000, dtype=np.int64) + (1 << 40)
    index = S.build_shard_index(xb, ids, factory="IVF8,PQ4,RFlat", train_sample=2000)
    assert S.exact_reconstruct(index) and S.refine_of(index) is not None
    truth = ids[brute_force(xq, xb, 10, "ip")]
    one = recall(S.search(index, xq, 10, nprobe=1)[1], truth)
    plain = recall(S.search(index, xq, 10, nprobe=8)[1], truth)
    assert one < plain  # nprobe took effect
    S.refine_of(index).k_factor = 8.0  # kept by serialization: a built index's own setting
    again = S.deserialize_index(S.serialize_index(index).tobytes())
    assert faiss.downcast_index(S.refine_of(again)).k_factor == 8.0
    D, I = S.search(again, xq, 10, nprobe=8)
    assert recall(I, truth) >= 0.98 and recall(I, truth) > plain + 0.2, (recall(I, truth), plain)
    _, I1 = S.search(again, xq, 10, nprobe=8, refine_k_factor=1)  # per call: the index keeps its own
    np.testing.assert_array_equal(I1, S.search(index, xq, 10, nprobe=8, refine_k_factor=1.0)[1])
    assert recall(I1, truth) < recall(I, truth) and faiss.downcast_index(S.refine_of(again)).k_factor == 8.0
    assert S.search_parameters(again, refine_k_factor=2).k_factor == 2.0  # without nprobe too
    S.set_search_params(again, refine_k_factor=1)
    assert S.current_search_params(again)["refine_k_factor"] == 1.0
    np.testing.assert_array_equal(S.search(again, xq, 10, nprobe=8)[1], I1)
