"""Evaluation metrics (EM/F1/recall), the metrics JSONL + plot, checkpoint folders, and the pure
helpers of the training step (candidate union, visited columns, batch schedule)."""

from __future__ import annotations

import itertools
import json

import torch

# ----------------------------------------------------------------------------------- step helpers


def _retrieved(ids, dim=3):
    from raggen.train.step import Retrieved

    emb = torch.tensor([[[float(hash((i, p)) % 97)] * dim for p in row] for i, row in enumerate(ids)])
    return Retrieved([list(r) for r in ids], [[f"text {p}" for p in row] for row in ids], emb)


def test_candidate_union_dedupes_keeps_order_and_pads():
    from raggen.train.step import candidate_union

    prior = _retrieved([[1, 2, 3], [4, 5, 6]])
    post = _retrieved([[3, 9, 1], [4, 5, 6]])
    u = candidate_union(prior, post)
    assert u.ids == [[1, 2, 3, 9], [4, 5, 6, None]]
    assert u.valid.tolist() == [[True, True, True, True], [True, True, True, False]]
    assert u.passages[0] == ["text 1", "text 2", "text 3", "text 9"]
    assert u.passages[1][3] == "text 4"  # padding repeats a real passage
    assert torch.equal(u.embeddings[0, 3], post.embeddings[0, 1])  # 9's vector came from the posterior
    assert torch.equal(u.embeddings[0, 2], prior.embeddings[0, 2])


def test_visited_columns_are_distinct_and_cover_the_visits():
    from raggen.train.step import _visited_columns

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = int(torch.randint(2, 8, (1,), generator=gen))
        states = torch.randint(0, c, (4, 5), generator=gen)
        cols = _visited_columns(states, c)
        m = max(len(set(row)) for row in states.tolist())
        assert cols.shape == (4, m)
        for row_states, row_cols in zip(states.tolist(), cols.tolist()):
            assert len(set(row_cols)) == len(row_cols)  # no repeats: a scatter routes each grad once
            assert set(row_states) <= set(row_cols)


def test_batch_schedule_is_a_pure_function_of_the_step():
    from raggen.train.batches import BatchSchedule

    rows = [{"id": str(i), "question": f"q{i}", "answers": [f"a{i}"]} for i in range(7)]
    a, b = BatchSchedule(rows, 3, seed=5), BatchSchedule(rows, 3, seed=5)
    seq_a = [a.batch(s).ids for s in range(6)]
    seq_b = [b.batch(s).ids for s in reversed(range(6))][::-1]  # another order of calls
    assert seq_a == seq_b
    flat = list(itertools.chain.from_iterable(seq_a))
    assert sorted(flat[:7]) == sorted(r["id"] for r in rows)  # each epoch is a permutation
    assert sorted(flat[7:14]) == sorted(r["id"] for r in rows)
    assert a.batch(0).targets == [f"a{i}" for i in map(int, a.batch(0).ids)]


def test_example_rows_decode_json_answers_and_sort():
    from raggen.train.batches import example_rows

    rows = example_rows(
        [
            {"id": "b", "question": "q", "answers": json.dumps(["x", "y"])},
            {"id": "a", "question": "p", "answers": ["z"]},
        ]
    )
    assert [r["id"] for r in rows] == ["a", "b"] and rows[1]["answers"] == ["x", "y"]
