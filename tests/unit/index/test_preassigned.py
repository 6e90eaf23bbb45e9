"""IVF search over lists assigned elsewhere equals FAISS's own search of the same index: bare IVF
and IVF re-ranked by refine codes behind its id map, both metrics, several nprobe / k_factor."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from raggen.index import shard as S
from raggen.index.preassigned import PreassignedSearch, preassignable_ivf, rescore, search_preassigned

D = 16
pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((12, D)).astype(np.float32) * 3
    xb = (centers[rng.integers(0, 12, 3000)] + rng.standard_normal((3000, D))).astype(np.float32)
    xq = (centers[rng.integers(0, 12, 40)] + rng.standard_normal((40, D))).astype(np.float32)
    return xb, xq


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ4", "IVF16,PQ4,RFlat", "IVF16,PQ4,Refine(SQfp16)",
                                     "IVF16,PQ4,Refine(SQ8)"])  # fmt: skip
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_preassigned_search_equals_the_index_own_search(data, factory, metric):
    xb, xq = data
    ids = np.arange(len(xb), dtype=np.int64) * 7 + 3  # not positions: the id map must be applied
    index = S.build_shard_index(xb, ids, factory=factory, metric=metric, train_sample=len(xb))
    ivf = preassignable_ivf(index)
    assert ivf is not None and ivf.nlist == 16
    refined = S.refine_of(index) is not None
    for nprobe in (1, 3, 16):
        for k_factor in (1.0, 2.5, 8.0) if refined else (None,):
            Dq, Iq = ivf.quantizer.search(xq, nprobe)
            want_d, want_i = S.search(index, xq, 10, nprobe=nprobe, refine_k_factor=k_factor)
            got_d, got_i = search_preassigned(index, xq, 10, Dq, Iq, refine_k_factor=k_factor)
            np.testing.assert_array_equal(got_i, want_i, err_msg=f"nprobe {nprobe}, k_factor {k_factor}")
            hit = want_i >= 0
            np.testing.assert_allclose(got_d[hit], want_d[hit], rtol=1e-5, atol=1e-4)
    if refined:  # None: the refine index's own k_factor, as FAISS's search uses it
        S.set_search_params(index, refine_k_factor=3.0)
        Dq, Iq = ivf.quantizer.search(xq, 2)
        np.testing.assert_array_equal(search_preassigned(index, xq, 5, Dq, Iq)[1], S.search(index, xq, 5, nprobe=2)[1])


def test_rescore_ranks_candidates_by_their_vectors_and_keeps_missing_ones_last():
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((50, D)).astype(np.float32)
    xq = rng.standard_normal((3, D)).astype(np.float32)
    candidates = np.array([[4, 9, -1, 17, 2], [-1, -1, -1, -1, -1], [30, 31, 32, 33, 34]])
    vectors = xb[np.maximum(candidates, 0)]  # (b, m, d); rows of -1 are masked
    dist, labels = rescore(vectors, xq, candidates, 4, faiss.METRIC_INNER_PRODUCT)
    for q in (0, 2):  # brute force over each query's valid candidates
        valid = candidates[q][candidates[q] >= 0]
        order = valid[np.argsort(-(xb[valid] @ xq[q]), kind="stable")][:4]
        np.testing.assert_array_equal(labels[q, : len(order)], order)
        np.testing.assert_allclose(dist[q, : len(order)], xb[order] @ xq[q], rtol=1e-5)
    assert (labels[1] == -1).all()
    l2, l2_labels = rescore(vectors, xq, candidates, 7, faiss.METRIC_L2)  # k beyond the candidates: padded
    want = candidates[2][np.argsort(((xb[candidates[2]] - xq[2]) ** 2).sum(1), kind="stable")]
    np.testing.assert_array_equal(l2_labels[2, :5], want)
    assert (l2_labels[:, 5:] == -1).all() and (l2_labels[0, 4:] == -1).all()


@pytest.mark.parametrize("factory", ["HNSW8", "Flat", "OPQ4,IVF16,PQ4", "PCA8,IVF16,Flat"])
def test_shapes_whose_lists_depend_on_more_than_the_query_take_no_assignment(data, factory):
    xb, _ = data
    index = S.build_shard_index(xb, np.arange(len(xb)), factory=factory, metric="ip", train_sample=len(xb))
    assert preassignable_ivf(index) is None
    with pytest.raises(ValueError, match="takes no IVF list assignment"):
        search_preassigned(index, xb[:1], 3, np.zeros((1, 1), np.float32), np.zeros((1, 1), np.int64))


def test_a_large_batch_is_rescored_in_chunks_with_the_same_answer(data, monkeypatch):
    """The candidates' vectors are decoded a few queries at a time (bounded memory for large batches)."""
    from raggen.index import preassigned

    xb, xq = data
    index = S.build_shard_index(xb, np.arange(len(xb)), factory="IVF16,PQ4,Refine(SQfp16)", metric="l2",
                                train_sample=len(xb))  # fmt: skip
    plan = preassigned.PreassignedSearch.of(index)
    Dq, Iq = plan.ivf.quantizer.search(xq, 4)
    whole = plan.search(xq, 7, Dq, Iq, refine_k_factor=3.0)
    monkeypatch.setattr(preassigned, "RESCORE_CHUNK_BYTES", 3 * 21 * D * 4)  # 3 queries of 21 candidates at once
    chunked = plan.search(xq, 7, Dq, Iq, refine_k_factor=3.0)
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(whole[1], S.search(index, xq, 7, nprobe=4, refine_k_factor=3.0)[1])


@pytest.mark.parametrize("factory", ["IVF16,PQ4,Refine(SQfp16)", "IVF16,PQ4,RFlat", "IVF16,PQ4,Refine(SQ8)"])
def test_refine_codes_read_in_place_from_a_memory_mapped_file(data, tmp_path, factory):
    """Served shards are opened memory-mapped (``open_index_file``): the codes are read where the
    file is mapped, with the same answer as FAISS's own search of the mapped index."""
    xb, xq = data
    path = tmp_path / "shard.faiss"
    S.write_index_file(S.build_shard_index(xb, np.arange(len(xb)) + 5, factory=factory, train_sample=len(xb)), path)
    mapped = S.open_index_file(path)
    plan = PreassignedSearch.of(mapped)
    assert plan is not None and plan.codes is not None and len(plan.codes) == len(xb)
    Dq, Iq = plan.ivf.quantizer.search(xq, 3)
    got = plan.search(xq, 6, Dq, Iq, refine_k_factor=2.0)
    np.testing.assert_array_equal(got[1], S.search(mapped, xq, 6, nprobe=3, refine_k_factor=2.0)[1])
