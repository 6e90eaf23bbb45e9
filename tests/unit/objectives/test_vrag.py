"""VRAG loss: brute-force ELBO, gradient routing, the sampled estimator's unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from raggen.objectives import rag_sequence_nll, sequence_logprob, truncated_log_softmax, vrag_loss


def _case(seed: int, b: int = 3, u: int = 6, t: int = 4):
    g = torch.Generator().manual_seed(seed)
    prior = torch.randn(b, u, generator=g, dtype=torch.float64)
    posterior = 2 * torch.randn(b, u, generator=g, dtype=torch.float64)
    token_logprobs = -torch.rand(b, u, t, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -1] = False
    return prior, posterior, token_logprobs, mask


def _brute_force(prior, posterior, seq, topk, beta):
    """Python loops over candidates: sort q, renormalise over its top-K, expectation and KL."""
    losses = []
    for b in range(prior.shape[0]):
        p = [math.exp(s) for s in prior[b].tolist()]
        p = [v / sum(p) for v in p]
        order = sorted(range(len(p)), key=lambda i: -posterior[b, i].item())[:topk]
        z = sum(math.exp(posterior[b, i].item()) for i in order)
        q = {i: math.exp(posterior[b, i].item()) / z for i in order}
        expected_nll = sum(q[i] * -seq[b, i].item() for i in order)
        kl = sum(q[i] * math.log(q[i] / p[i]) for i in order)
        losses.append(expected_nll + beta * kl)
    return sum(losses) / len(losses)


@pytest.mark.parametrize(("topk", "beta"), [(1, 1.0), (3, 0.5), (6, 1.0), (2, 0.0)])
def test_exact_loss_matches_brute_force(topk, beta):
    prior, posterior, tok, mask = _case(topk)
    seq = sequence_logprob(tok, mask)
    loss, _ = vrag_loss(prior, posterior, tok, mask, posterior_topk=topk, beta=beta)
    assert loss.item() == pytest.approx(_brute_force(prior, posterior, seq, topk, beta), rel=1e-10)
    loss_seq, _ = vrag_loss(prior, posterior, seq, posterior_topk=topk, beta=beta)
    assert loss_seq.item() == pytest.approx(loss.item(), rel=1e-12)


def test_elbo_bounds_the_marginal_nll_and_is_tight_at_the_true_posterior():
    prior, posterior, tok, mask = _case(11)
    u = prior.shape[1]
    nll = rag_sequence_nll(prior, tok, mask)  # -log p(y|x) over the same candidates
    loose, _ = vrag_loss(prior, posterior, tok, mask, posterior_topk=u, beta=1.0)
    assert loose.item() > nll.mean().item() + 1e-3
    true_posterior = torch.log_softmax(prior, -1) + sequence_logprob(tok, mask)
    tight, diagnostics = vrag_loss(prior, true_posterior, tok, mask, posterior_topk=u, beta=1.0)
    assert tight.item() == pytest.approx(nll.mean().item(), rel=1e-10)
    assert diagnostics["posterior_topk_mass"].item() == pytest.approx(1.0)


def test_gradient_routing_exact_mode():
    prior, posterior, tok, mask = _case(12)
    b, u = prior.shape
    topk, beta = 3, 0.7
    seq = sequence_logprob(tok, mask).requires_grad_(True)
    prior.requires_grad_(True)
    posterior.requires_grad_(True)
    loss, diagnostics = vrag_loss(prior, posterior, seq, posterior_topk=topk, beta=beta)
    g_prior, g_post, g_gen = torch.autograd.grad(loss, (prior, posterior, seq))
    log_q, in_topk = truncated_log_softmax(posterior.detach(), topk)
    q = log_q.exp()
    # Generator: -q_k / b on the posterior's top-K, nothing elsewhere.
    torch.testing.assert_close(g_gen, -q / b)
    # Prior: only the KL's gradient, beta * (p - q) / b.
    torch.testing.assert_close(g_prior, beta * (torch.softmax(prior.detach(), -1) - q) / b)
    # Posterior: gradient on its top-K only, none outside.
    assert (g_post[~in_topk] == 0).all() and (g_post[in_topk].abs() > 0).all()
    assert all(not v.requires_grad for v in diagnostics.values())


def test_prior_gets_no_gradient_without_the_kl():
    prior, posterior, tok, mask = _case(13)
    prior.requires_grad_(True)
    loss, _ = vrag_loss(prior, posterior, tok, mask, posterior_topk=2, beta=0.0)
    (g_prior,) = torch.autograd.grad(loss, prior, allow_unused=True)
    assert g_prior is None or (g_prior == 0).all()


def test_sampled_estimator_is_unbiased_for_the_exact_gradient():
    prior, posterior, tok, mask = _case(14, b=1)
    seq = sequence_logprob(tok, mask)
    leaves = [x.clone().requires_grad_(True) for x in (prior, posterior, seq)]
    exact, _ = vrag_loss(*leaves, posterior_topk=4, beta=0.8)
    exact_grads = torch.autograd.grad(exact, leaves)
    n = 40000  # independent draws, one per replicated row; the batch mean averages them
    rows = [x.expand(n, -1) for x in leaves]
    gen = torch.Generator().manual_seed(0)
    sampled, _ = vrag_loss(*rows, posterior_topk=4, beta=0.8, num_samples=3, generator=gen)
    sampled_grads = torch.autograd.grad(sampled, leaves)
    assert sampled.item() == pytest.approx(exact.item(), abs=0.02)
    for got, want in zip(sampled_grads, exact_grads):
        torch.testing.assert_close(got, want, atol=0.01, rtol=0.0)


def test_padded_candidates_change_nothing():
    prior, posterior, tok, mask = _case(15, u=4)
    seq = sequence_logprob(tok, mask)
    pad = torch.full((prior.shape[0], 2), 50.0, dtype=torch.float64)  # would dominate if counted
    valid = torch.cat([torch.ones_like(prior, dtype=torch.bool), torch.zeros_like(pad, dtype=torch.bool)], 1)
    seq_padded = torch.cat([seq, torch.full_like(pad, float("nan"))], 1)
    for topk in (2, 4, 5):  # 5 > valid count: the padding slot picked by top-k still gets q = 0
        padded, _ = vrag_loss(
            torch.cat([prior, pad], 1),
            torch.cat([posterior, pad], 1),
            seq_padded,
            posterior_topk=topk,
            candidate_mask=valid,
        )
        plain, _ = vrag_loss(prior, posterior, seq, posterior_topk=min(topk, 4))
        assert padded.item() == pytest.approx(plain.item(), rel=1e-12)


def test_temperature_and_length_normalisation_options():
    prior, posterior, tok, mask = _case(16)
    hot, _ = vrag_loss(prior, posterior, tok, mask, posterior_topk=3, temperature=0.1)
    scaled, _ = vrag_loss(prior / 0.1, posterior / 0.1, tok, mask, posterior_topk=3)
    assert hot.item() == pytest.approx(scaled.item(), rel=1e-12)
    norm, _ = vrag_loss(prior, posterior, tok, mask, posterior_topk=3, length_normalize=True)
    manual, _ = vrag_loss(prior, posterior, sequence_logprob(tok, mask, length_normalize=True), posterior_topk=3)
    assert norm.item() == pytest.approx(manual.item(), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(posterior_topk=0),
        dict(posterior_topk=7),
        dict(posterior_topk=2, beta=-1.0),
        dict(posterior_topk=2, num_samples=-1),
        dict(posterior_topk=2, temperature=0.0),
    ],
)
def test_bad_arguments_raise(kwargs):
    prior, posterior, tok, mask = _case(17)
    with pytest.raises(ValueError):
        vrag_loss(prior, posterior, tok, mask, **kwargs)


def test_bad_shapes_raise():
    prior, posterior, tok, mask = _case(18)
    with pytest.raises(ValueError):
        vrag_loss(prior, posterior[:, :-1], tok, mask, posterior_topk=2)
    with pytest.raises(ValueError):
        vrag_loss(prior, posterior, tok, None, posterior_topk=2)  # per-token needs a mask
    with pytest.raises(ValueError):
        vrag_loss(prior, posterior, sequence_logprob(tok, mask), posterior_topk=2, length_normalize=True)
