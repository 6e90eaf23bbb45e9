"""Each Ray Train worker's share of the QA rows (``rank_share``) and the examples built from it."""

from __future__ import annotations

import json
import random

import pytest

from raggen.errors import ConfigError
from raggen.train.batches import example_rows, rank_share


def _rows(n: int) -> list[dict]:
    return [{"id": f"q{i:03d}", "question": f"question {i}?", "answers": json.dumps([f"a{i}"])} for i in range(n)]


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (7, 3), (5, 1), (3, 3)])
def test_shares_are_disjoint_equal_and_cover_all_but_the_remainder(n, world):
    rows = _rows(n)
    shares = [rank_share(rows, r, world) for r in range(world)]
    ids = [[row["id"] for row in share] for share in shares]
    assert {len(s) for s in ids} == {n // world}
    flat = [i for s in ids for i in s]
    assert len(set(flat)) == len(flat) == n - n % world
    # brute force: the rows sorted by id, dealt out in turn, the last n % world left over
    dealt = sorted(row["id"] for row in rows)[: n - n % world]
    assert ids == [dealt[r::world] for r in range(world)]


def test_a_share_does_not_depend_on_the_order_the_rows_came_in():
    rows = _rows(13)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    for rank in range(3):
        assert rank_share(shuffled, rank, 3) == rank_share(rows, rank, 3)


def test_a_rank_outside_the_world_is_refused_and_an_empty_share_names_the_field():
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        rank_share(_rows(4), 2, 2)
    with pytest.raises(ConfigError, match="train.train_file"):
        example_rows(rank_share(_rows(1), 1, 2))


def test_examples_decode_the_answers():
    ex = example_rows(rank_share(_rows(4), 1, 2))
    assert [e["id"] for e in ex] == ["q001", "q003"] and ex[0]["answers"] == ["a1"]
