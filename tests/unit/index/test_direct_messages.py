"""The bodies of direct calls to shard actors: every field comes back as it went, arrays as raw bytes."""

from __future__ import annotations

import pickle

import numpy as np

from raggen.index import direct_messages as M
from raggen.index.search_params import SearchParams


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and a.flags.writeable
    np.testing.assert_array_equal(a, b)


def test_topk_request_and_answer_round_trip():
    rng = np.random.default_rng(0)
    xq = rng.standard_normal((3, 8)).astype(np.float32)
    Dq, Iq = rng.standard_normal((3, 2)).astype(np.float32), rng.integers(0, 16, (3, 2))
    params = SearchParams(nprobe=2, refine_k_factor=4.0)
    for assignment in (None, (Dq, Iq)):
        body = M.topk_request(xq[:, ::1], 5, params, assignment)
        got_xq, k, got_params, got_assignment = M.read_topk_request(body)
        _same(got_xq, xq)
        assert k == 5 and got_params == params
        if assignment is None:
            assert got_assignment is None
        else:
            _same(got_assignment[0], Dq)
            _same(got_assignment[1], Iq)
        assert b"numpy" not in body  # raw bytes, not numpy's pickled reduce
    answer = (np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(6).reshape(2, 3), -np.ones((2, 3), np.int64))
    for got, want in zip(M.read_topk_answer(M.topk_answer(answer)), answer):
        _same(got, want)
    fortran = np.asfortranarray(
        rng.standard_normal((4, 3)).astype(np.float32)
    )  # a column-major view arrives as its values
    _same(M.read_topk_request(M.topk_request(fortran, 1, SearchParams()))[0], np.ascontiguousarray(fortran))


def test_fetch_request_and_answer_round_trip():
    requests = {3: np.array([5, 7], np.int64), 0: np.array([], np.int64)}
    got, embeddings = M.read_fetch_request(M.fetch_request(requests, True))
    assert embeddings is True and list(got) == [3, 0]
    for s in requests:
        _same(got[s], requests[s])
    vectors = np.arange(8, dtype=np.float32).reshape(2, 4)
    fetched = {3: (["p5", "p7"], ["t5", "t7"], ["x5", "é7"], vectors), 0: ([], [], [], None)}
    back = M.read_fetch_answer(M.fetch_answer(fetched))
    assert back[3][:3] == (["p5", "p7"], ["t5", "t7"], ["x5", "é7"]) and back[0] == ([], [], [], None)
    _same(back[3][3], vectors)
    assert b"numpy" not in M.fetch_answer(fetched) and pickle.loads(M.fetch_answer(fetched))[0][3] is None
