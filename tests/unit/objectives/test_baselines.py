"""EMDR² and perplexity distillation: brute-force values and where their gradients go."""

from __future__ import annotations

import math

import pytest
import torch

from raggen.objectives import emdr2_loss, pdist_loss, rag_sequence_nll


def _case(seed: int, b: int = 3, k: int = 5):
    g = torch.Generator().manual_seed(seed)
    doc_scores = torch.randn(b, k, generator=g, dtype=torch.float64)
    seq_logprob = -torch.rand(b, k, generator=g, dtype=torch.float64) * 6
    return doc_scores, seq_logprob


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_emdr2_value_matches_brute_force():
    doc_scores, seq = _case(0)
    loss, diagnostics = emdr2_loss(doc_scores, seq)
    marginal_nll = [
        -math.log(sum(p * math.exp(s) for p, s in zip(_softmax(doc_scores[b].tolist()), seq[b].tolist())))
        for b in range(doc_scores.shape[0])
    ]
    # Default reader term has the same value as the retriever term: both are the marginal NLL.
    assert loss.item() == pytest.approx(2 * sum(marginal_nll) / len(marginal_nll), rel=1e-12)
    assert diagnostics["retriever_loss"].item() == pytest.approx(sum(marginal_nll) / len(marginal_nll), rel=1e-12)


def test_emdr2_gradients_are_prior_minus_posterior_and_posterior_weighted_nll():
    doc_scores, seq = _case(1)
    b = doc_scores.shape[0]
    doc_scores.requires_grad_(True)
    seq.requires_grad_(True)
    loss, _ = emdr2_loss(doc_scores, seq)
    g_doc, g_seq = torch.autograd.grad(loss, (doc_scores, seq))
    prior = torch.softmax(doc_scores.detach(), -1)
    posterior = torch.softmax(torch.log(prior) + seq.detach(), -1)
    torch.testing.assert_close(g_doc, (prior - posterior) / b)
    torch.testing.assert_close(g_seq, -posterior / b)
    # ... which, summed, is exactly the RAG-Sequence gradient (EMDR² differs only with a FiD reader).
    rag = rag_sequence_nll(doc_scores, seq.unsqueeze(-1), torch.ones(b, 1)).mean()
    r_doc, r_seq = torch.autograd.grad(rag, (doc_scores, seq))
    torch.testing.assert_close((g_doc, g_seq), (r_doc, r_seq))


def test_emdr2_with_a_fid_reader_keeps_the_passage_likelihoods_out_of_the_graph():
    doc_scores, seq = _case(2)
    seq.requires_grad_(True)
    reader_nll = torch.rand(doc_scores.shape[0], dtype=torch.float64, requires_grad=True)
    loss, diagnostics = emdr2_loss(doc_scores, seq, reader_nll=reader_nll)
    g_seq, g_reader = torch.autograd.grad(loss, (seq, reader_nll), allow_unused=True)
    assert g_seq is None or (g_seq == 0).all()
    torch.testing.assert_close(g_reader, torch.full_like(reader_nll, 1 / reader_nll.numel()))
    assert diagnostics["reader_loss"].item() == pytest.approx(reader_nll.mean().item())
    with pytest.raises(ValueError):
        emdr2_loss(doc_scores, seq, reader_nll=reader_nll[:-1])


@pytest.mark.parametrize(("lm_t", "retr_t"), [(1.0, 1.0), (0.5, 2.0)])
def test_pdist_value_matches_brute_force(lm_t, retr_t):
    doc_scores, seq = _case(3)
    loss, diagnostics = pdist_loss(doc_scores, seq, lm_temperature=lm_t, retriever_temperature=retr_t)
    kls = []
    for b in range(doc_scores.shape[0]):
        target = _softmax([s / lm_t for s in seq[b].tolist()])
        retriever = _softmax([s / retr_t for s in doc_scores[b].tolist()])
        kls.append(sum(t * math.log(t / r) for t, r in zip(target, retriever)))
    assert loss.item() == pytest.approx(sum(kls) / len(kls), rel=1e-12)
    assert diagnostics["kl"].item() == pytest.approx(loss.item(), rel=1e-12)


def test_pdist_trains_only_the_retriever_and_vanishes_when_it_matches_the_lm():
    doc_scores, seq = _case(4)
    b = doc_scores.shape[0]
    doc_scores.requires_grad_(True)
    seq.requires_grad_(True)
    loss, _ = pdist_loss(doc_scores, seq, retriever_temperature=2.0)
    g_doc, g_seq = torch.autograd.grad(loss, (doc_scores, seq), allow_unused=True)
    assert g_seq is None or (g_seq == 0).all()
    target = torch.softmax(seq.detach(), -1)
    torch.testing.assert_close(g_doc, (torch.softmax(doc_scores.detach() / 2.0, -1) - target) / (2.0 * b))
    matched, _ = pdist_loss(seq.detach() * 2.0 + 3.0, seq, lm_temperature=0.5)
    assert matched.item() == pytest.approx(0.0, abs=1e-12)


def test_pdist_adds_the_reader_loss():
    doc_scores, seq = _case(5)
    reader_nll = torch.rand(doc_scores.shape[0], dtype=torch.float64)
    alone, _ = pdist_loss(doc_scores, seq)
    total, diagnostics = pdist_loss(doc_scores, seq, reader_nll)
    assert total.item() == pytest.approx(alone.item() + reader_nll.mean().item(), rel=1e-12)
    assert "reader_loss" in diagnostics and not diagnostics["kl"].requires_grad


@pytest.mark.parametrize("fn", [emdr2_loss, pdist_loss])
def test_bad_shapes_raise(fn):
    doc_scores, seq = _case(6)
    with pytest.raises(ValueError):
        fn(doc_scores, seq[:, :-1])
    with pytest.raises(ValueError):
        fn(doc_scores[0], seq[0])


def test_pdist_rejects_non_positive_temperatures():
    doc_scores, seq = _case(7)
    with pytest.raises(ValueError):
        pdist_loss(doc_scores, seq, lm_temperature=0.0)
    with pytest.raises(ValueError):
        pdist_loss(doc_scores, seq, retriever_temperature=-1.0)
