"""Reranker: (b, c) cross-encoder scores, with grad, equal whether pairs are scored together or alone."""

from __future__ import annotations

import pytest
import torch

from raggen.models.reranker import Reranker
from raggen.models.tiny import make_tiny_encoder, make_tiny_reranker

QUESTIONS = ["who wrote hamlet?", "what is the capital of france"]
PASSAGES = [
    ["shakespeare wrote hamlet", "the thames is a river in england and flows to the sea", "bread"],
    ["paris", "france borders spain", "the capital of france is paris, a large city"],
]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> Reranker:
    path = make_tiny_reranker(str(tmp_path_factory.mktemp("reranker") / "r"), seed=2)
    return Reranker.from_pretrained(path, max_length=64).eval()


def test_scores_have_shape_b_by_c_and_carry_grad(reranker):
    scores = reranker(QUESTIONS, PASSAGES)
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    assert scores.requires_grad
    torch.log_softmax(scores, dim=-1)[:, 0].sum().backward()
    grads = [p.grad for p in reranker.model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    reranker.model.zero_grad(set_to_none=True)


def test_batched_scores_equal_each_pair_scored_alone(reranker):
    with torch.no_grad():
        batched = reranker(QUESTIONS, PASSAGES)
        for b, q in enumerate(QUESTIONS):
            for c, p in enumerate(PASSAGES[b]):
                alone = reranker([q], [[p]])
                torch.testing.assert_close(batched[b, c], alone[0, 0], atol=1e-5, rtol=1e-5)
    assert batched.std() > 0  # the pairs do not all score the same


def test_score_helper_batches_without_graph(reranker):
    with torch.no_grad():
        full = reranker(QUESTIONS, PASSAGES)
    chunked = reranker.score(QUESTIONS, PASSAGES, batch_size=1)
    assert not chunked.requires_grad and chunked.device.type == "cpu"
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert not reranker.training


def test_long_pairs_are_truncated_to_max_length(reranker):
    long_passage = " ".join(["word"] * 500)
    batch = reranker.tokenize([QUESTIONS[0]], [[long_passage]])
    assert batch["input_ids"].shape[1] == reranker.max_length
    assert torch.isfinite(reranker([QUESTIONS[0]], [[long_passage]])).all()


def test_ragged_candidates_are_refused(reranker):
    with pytest.raises(ValueError, match=r"passages\[1\]"):
        reranker(QUESTIONS, [["a", "b"], ["c"]])


def test_save_and_reload_give_the_same_scores(reranker, tmp_path):
    reranker.save_pretrained(str(tmp_path / "saved"))
    again = Reranker.from_pretrained(str(tmp_path / "saved"), max_length=64).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(QUESTIONS, PASSAGES), reranker(QUESTIONS, PASSAGES))


def test_a_plain_encoder_is_refused_unless_a_fresh_head_is_asked_for(tmp_path):
    from raggen.errors import ConfigError

    path = make_tiny_encoder(str(tmp_path / "enc"))
    with pytest.raises(ConfigError, match="reranker .*classifier"):
        Reranker.from_pretrained(path)
    reranker = Reranker.from_pretrained(path, new_head=True)
    assert reranker.model.config.num_labels == 1
    assert reranker(QUESTIONS, PASSAGES).shape == (2, 3)
