"""Relaxed top-k masks (subset and max), their hard limits and sampling law, and the G-Rerank flow."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from raggen.objectives import (
    gumbel_noise,
    gumbel_rerank_loss,
    hard_topk_mask,
    passage_attention_bias,
    relaxed_topk_mask,
)


def _scores(seed: int, b: int = 5, c: int = 8) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("tau", [5.0, 1.0, 0.1])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_subset_rows_sum_to_k_and_are_non_negative(tau, k):
    mask = relaxed_topk_mask(_scores(0), k, tau, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mask.sum(-1), torch.full((5,), float(k), dtype=torch.float64))
    assert (mask >= 0).all()  # entries may exceed 1 at large tau (the relaxation's known slack)


def test_subset_becomes_the_hard_topk_of_the_perturbed_scores_as_tau_goes_to_zero():
    scores = _scores(2)
    noise = gumbel_noise(tuple(scores.shape), torch.Generator().manual_seed(3), dtype=torch.float64)
    hard = hard_topk_mask(scores + noise, 3)
    taus = (1.0, 0.1, 1e-3, 1e-5)
    distances = [(relaxed_topk_mask(scores, 3, tau, noise=noise) - hard).abs().max().item() for tau in taus]
    assert all(a >= b for a, b in zip(distances, distances[1:]))
    assert distances[0] > 0.1 and distances[-1] < 1e-6


def test_max_becomes_the_union_of_the_k_draws_argmaxes_as_tau_goes_to_zero():
    scores, k, kappa = _scores(4), 3, 2.0
    noise = gumbel_noise((k, *scores.shape), torch.Generator().manual_seed(5), dtype=torch.float64)
    argmaxes = (kappa * scores.unsqueeze(0) + noise).argmax(-1)  # (k, b)
    union = torch.zeros_like(scores)
    for draw in argmaxes:
        union.scatter_(1, draw.unsqueeze(1), 1.0)
    mask = relaxed_topk_mask(scores, k, 1e-5, method="max", kappa=kappa, noise=noise)
    torch.testing.assert_close(mask, union, atol=1e-6, rtol=0)
    soft = relaxed_topk_mask(scores, k, 1.0, method="max", kappa=kappa, noise=noise)
    assert (soft >= 0).all() and (soft <= 1).all() and (soft.sum(-1) >= 1 - 1e-9).all() and (soft.sum(-1) <= k).all()
    assert (soft - union).abs().max() > 0.1


def test_subset_samples_k_passages_without_replacement_in_proportion_to_exp_score():
    # Brute force: P({i, j}) = sum over orders of the Plackett-Luce probability p_i p_j / (1 - p_i) + ...
    scores = torch.tensor([1.0, 0.0, -0.5, 0.7], dtype=torch.float64)
    p = torch.softmax(scores, -1).tolist()
    pairs = list(itertools.combinations(range(4), 2))
    expected = {pair: sum(p[a] * p[b] / (1 - p[a]) for a, b in (pair, pair[::-1])) for pair in pairs}
    n = 20000
    mask = relaxed_topk_mask(scores.expand(n, -1), 2, 1e-4, generator=torch.Generator().manual_seed(6))
    chosen = mask.round().bool()
    assert (chosen.sum(-1) == 2).all()
    tv = 0.5 * sum(abs((chosen[:, a] & chosen[:, b]).double().mean().item() - expected[(a, b)]) for a, b in pairs)
    assert tv < 0.02


@pytest.mark.parametrize("method", ["subset", "max"])
def test_relaxed_masks_are_differentiable(method):
    scores = _scores(7, b=2, c=5).requires_grad_(True)
    k = 2
    shape = tuple(scores.shape) if method == "subset" else (k, *scores.shape)
    noise = gumbel_noise(shape, torch.Generator().manual_seed(8), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: relaxed_topk_mask(s, k, 0.5, method=method, noise=noise), (scores,))


def test_hard_topk_mask_marks_the_top_k():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    assert hard_topk_mask(scores, 2).tolist() == [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]


def test_attention_bias_turns_weights_into_mask_times_exp_score():
    mask = torch.tensor([[1.0, 0.25, 0.0, 0.5]], dtype=torch.float64)
    logits = torch.tensor([[0.3, -0.2, 2.0, 1.0]], dtype=torch.float64)
    eps = 1e-9
    weights = torch.softmax(logits + passage_attention_bias(mask, eps=eps), -1)
    expected = (mask + eps) * logits.exp()
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True))
    per_token = passage_attention_bias(mask, eps=eps, tokens_per_passage=3)
    assert per_token.shape == (1, 12)
    torch.testing.assert_close(per_token[0, 3:6], torch.log(mask[0, 1] + eps).expand(3))


def _toy_reader_token_logprobs(mask: torch.Tensor, passages: torch.Tensor, readout: torch.Tensor, answer: torch.Tensor):
    """A frozen one-step FiD-like reader: attention over K passage vectors with the mask's bias,
    then a readout to the vocabulary. Returns log p(answer) as (b, 1) token log-probs."""
    attention = torch.softmax(passage_attention_bias(mask), -1)  # (b, k): equal raw logits
    context = attention @ passages  # (b, d)
    logprobs = torch.log_softmax(context @ readout, -1)  # (b, v)
    return logprobs.gather(1, answer.unsqueeze(1))  # (b, 1)


def test_reranker_learns_the_useful_passage_through_the_relaxed_mask():
    # Passage 2 makes the reader predict the answer; the reranker's scores start uniform and are
    # trained only through gumbel_rerank_loss -> soft mask -> reader attention.
    torch.manual_seed(0)
    k_passages, d, vocab = 6, 8, 5
    passages = torch.zeros(k_passages, d)
    passages[2, 0] = 4.0
    readout = torch.zeros(d, vocab)
    readout[0, 3] = 3.0
    answer = torch.full((4,), 3)
    scores = torch.zeros(4, k_passages, requires_grad=True)
    optimizer = torch.optim.Adam([scores], lr=0.1)
    gen = torch.Generator().manual_seed(9)
    for _ in range(60):
        mask = relaxed_topk_mask(scores, 1, 0.5, generator=gen)
        token_logprobs = _toy_reader_token_logprobs(mask, passages, readout, answer)
        loss, diagnostics = gumbel_rerank_loss(token_logprobs, torch.ones(4, 1), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (scores.argmax(-1) == 2).all()
    assert 0 <= diagnostics["mask_hardness"].item() <= 0.5 and not diagnostics["nll"].requires_grad


def test_gumbel_rerank_loss_is_the_masked_answer_nll():
    token_logprobs = -torch.rand(3, 4, dtype=torch.float64)
    answer_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    loss, diagnostics = gumbel_rerank_loss(token_logprobs, answer_mask, hard_topk_mask(_scores(10, b=3), 2))
    expected = -sum((token_logprobs[b] * answer_mask[b]).sum() for b in range(3)) / 3
    assert loss.item() == pytest.approx(expected.item())
    assert diagnostics["mask_hardness"].item() == 0.0 and diagnostics["mask_max"].item() == 1.0
    normalised, _ = gumbel_rerank_loss(token_logprobs, answer_mask, length_normalize=True)
    lengths = answer_mask.sum(-1)
    assert normalised.item() == pytest.approx((-(token_logprobs * answer_mask).sum(-1) / lengths).mean().item())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(k=0, tau=1.0),
        dict(k=9, tau=1.0),
        dict(k=2, tau=0.0),
        dict(k=2, tau=1.0, method="top"),
        dict(k=2, tau=1.0, noise=torch.zeros(3, 3)),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        relaxed_topk_mask(_scores(11), **kwargs)
    with pytest.raises(ValueError):
        passage_attention_bias(torch.ones(2, 3), eps=0.0)


def test_gumbel_noise_has_the_gumbel_mean():
    noise = gumbel_noise((200000,), torch.Generator().manual_seed(12), dtype=torch.float64)
    assert noise.mean().item() == pytest.approx(0.5772156649, abs=0.01)  # Euler–Mascheroni
    assert math.isfinite(noise.max().item()) and math.isfinite(noise.min().item())
