"""The one retrieve-and-format path (raggen.retrieval.search) on a real published index."""

from __future__ import annotations

import numpy as np
import pytest

from raggen.errors import ConfigError
from raggen.index import open_index
from raggen.retrieval.search import hits, reader_passages, search_passages
from tests.helpers import publish_random_version


@pytest.fixture()
def index(tmp_path):
    root = str(tmp_path / "root")
    publish_random_version(root, tmp_path, "v1", "2026-01-01T00:00:00.000000Z", n=6, seed=3)
    opened = open_index(root)
    yield opened
    opened.close()


def test_search_passages_is_the_index_search_and_vectors_only_when_asked(index):
    xq = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    direct = index.search(xq, 4)
    got = search_passages(index, xq, 4)
    assert got.ids == direct.ids and np.array_equal(got.row_ids, direct.row_ids)
    assert not got.embeddings.any()  # serving and eval never pull stored vectors
    with_vectors = search_passages(index, xq, 4, embeddings=True)
    assert np.allclose(with_vectors.embeddings, direct.embeddings) and direct.embeddings.any()


def test_a_sparse_mode_on_a_dense_only_index_is_a_config_error(index):
    with pytest.raises(ConfigError, match="retrieval.mode: 'sparse'"):
        search_passages(index, np.zeros((1, 8), np.float32), 2, questions=["q"], mode="sparse")


def test_hits_leave_out_padding_and_reader_passages_join_title_and_text(index):
    xq = np.ones((1, 8), np.float32)
    result = search_passages(index, xq, 10)  # 6 passages: 4 padded slots
    (row,) = hits(result, [10])
    assert [h["id"] for h in row] == [i for i in result.ids[0] if i] and len(row) == 6
    assert all(h["score"] >= nxt["score"] for h, nxt in zip(row, row[1:]))
    assert hits(result, [2])[0] == row[:2]
    texts = reader_passages(search_passages(index, xq, 2))[0]
    assert texts == [f"text {h['id'].split('-')[1]}" for h in row[:2]]  # untitled: the text alone
