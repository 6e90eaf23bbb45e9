"""The HTTP contract without Ray: request validation (types + config bounds), auth, error bodies,
the index holder's swap/refuse rules, and the app args / Serve config builders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raggen.serve.schemas import RequestLimits

LIMITS = RequestLimits(max_question_chars=50, default_top_k=3, max_top_k=5, max_new_tokens=8)


# ---------------------------------------------------------------------------------- stage functions


def _hits(texts: list[str], scores: list[float]) -> list[dict]:
    return [{"id": f"p{i}", "title": f"T{i}", "text": t, "score": s} for i, (t, s) in enumerate(zip(texts, scores))]


def test_rerank_batch_keeps_the_cross_encoders_top_k(tmp_path):
    from raggen.models import Reranker, make_tiny_reranker, passage_text
    from raggen.serve.deployments import rerank_batch

    reranker = Reranker.from_pretrained(make_tiny_reranker(str(tmp_path / "rr"))).eval()
    questions = ["where is the mill?", "who owns the ferry?"]
    candidates = [
        _hits(["the mill is in Ost", "a ferry crosses", "bread and salt"], [3.0, 2.0, 1.0]),
        _hits(["the ferry belongs to Ada", "a quiet river"], [5.0, 4.0]),
    ]
    out = rerank_batch(reranker, questions, candidates, [2, 1])
    for q, cands, k, got in zip(questions, candidates, [2, 1], out):  # brute force: one question at a time
        scores = reranker.score([q], [[passage_text(h["title"], h["text"]) for h in cands]])[0]
        order = sorted(range(len(cands)), key=lambda j: -float(scores[j]))[:k]
        assert [h["id"] for h in got] == [cands[j]["id"] for j in order]
        np.testing.assert_allclose([h["score"] for h in got], [float(scores[j]) for j in order], atol=1e-4)
        assert all(h["text"] == cands[int(h["id"][1:])]["text"] for h in got)


def test_generate_batch_groups_mixed_requests(tmp_path):
    from raggen.models import Generator, make_tiny_generator
    from raggen.serve.deployments import decode_answers, generate_batch

    generator = Generator.from_pretrained(make_tiny_generator(str(tmp_path / "gen")), max_target_length=6).eval()
    questions = ["q one", "q two", "q three", "q four"]
    hits = [_hits(["a b", "c d"], [1.0, 0.5]), _hits(["e f"], [2.0]), [], _hits(["g h", "i j"], [0.1, 0.2])]
    decodings = ["rag-token", "rag-sequence-thorough", "rag-token", "rag-token"]
    answers = generate_batch(generator, questions, hits, decodings, [3, 3, 3, 3], num_beams=2)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers) and answers[2] == ""
    with torch.no_grad():  # rows 0 and 3 share (rag-token, k=2, 3 tokens): one group, same as decoding them alone
        together = decode_answers(generator, ["q one", "q four"], [hits[0], hits[3]], "rag-token", 3, 2)
    assert [answers[0], answers[3]] == together
    with pytest.raises(ValueError, match="decoding"):
        decode_answers(generator, ["q"], [hits[1]], "greedy", 3, 2)
