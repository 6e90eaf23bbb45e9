"""VRAG: variational RAG, trained on the evidence lower bound with a posterior retriever.

Over the union U of the prior and posterior top-Ks of one example,

    L = E_{z ~ q_K}[ -log p(y | x, z) ] + beta * KL(q_K || p)

where p(z|x) = softmax(prior_scores / T) over U, and q_K(z|x,y) is the posterior retriever's
softmax(posterior_scores / T) *renormalised over its own top-K* (posterior_topk) candidates in U:
q_K(z) = exp(s_z) / sum_{z' in topK} exp(s_z') for z in topK, 0 elsewhere. With beta = 1 this is
the negative ELBO of log p(y|x) for the truncated posterior.

Gradient to q. Default (``num_samples=0``): exact enumeration over the K support points,
sum_k q_k * (-log p(y|x,z_k)) + beta * sum_k q_k (log q_k - log p_k), so q's gradient is exact
(no sampling noise, biased only by the top-K truncation and by q != the true posterior).
``num_samples=S > 0``: the sampled (score-function, REINFORCE) estimator that the JSA-RAG paper
calls high-variance: z_1..S ~ q_K, f(z) = -log p(y|x,z) + beta (log q_K(z) - log p(z)),
grad = mean_s [grad f(z_s) + (f(z_s) - b_s) grad log q_K(z_s)] with b_s the leave-one-out mean
of the other samples' f (0 when S = 1). Its forward value is the Monte-Carlo estimate of L.

Routing, both modes: the generator gets gradient through log p(y|x,z), the posterior through q_K
(expectation and KL), the prior only through the KL term (none when beta = 0).
"""

from __future__ import annotations

import torch

from raggen.objectives._common import (
    check_dims,
    check_same_shape,
    detached,
    entropy,
    gen_logprob_from_either,
    masked_scores,
    scaled_scores,
)


def truncated_log_softmax(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax of ``scores`` renormalised over each row's top-``topk``; -inf elsewhere.

    Returns (log_q (b, u), in_topk bool (b, u)). Gradients reach only the top-k entries.
    """
    b, u = scores.shape
    if not 1 <= topk <= u:
        raise ValueError(f"posterior_topk: must be in [1, {u}] (the number of candidates), got {topk}")
    top_idx = scores.topk(topk, dim=-1).indices  # (b, topk)
    in_topk = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_idx, True)
    in_topk &= scores > float("-inf")  # padding candidates never count, even when picked
    log_q = torch.log_softmax(scores.masked_fill(~in_topk, float("-inf")), dim=-1)  # (b, u)
    return log_q, in_topk


def _sampled_surrogate(
    log_q: torch.Tensor, f: torch.Tensor, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Score-function surrogate, per example (b,); forward value = mean_s f(z_s)."""
    with torch.no_grad():
        idx = torch.multinomial(log_q.exp(), num_samples, replacement=True, generator=generator)
    f_s = f.gather(1, idx)  # (b, s)
    log_q_s = log_q.gather(1, idx)  # (b, s)
    f_const = f_s.detach()
    if num_samples > 1:
        baseline = (f_const.sum(-1, keepdim=True) - f_const) / (num_samples - 1)  # leave-one-out
    else:
        baseline = torch.zeros_like(f_const)
    score_term = (f_const - baseline) * (log_q_s - log_q_s.detach())  # value 0, grad (f-b) dlog q
    return (f_s + score_term).mean(-1)  # (b,)


def vrag_loss(
    prior_scores: torch.Tensor,
    posterior_scores: torch.Tensor,
    gen_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    posterior_topk: int,
    beta: float = 1.0,
    temperature: float = 1.0,
    length_normalize: bool = False,
    candidate_mask: torch.Tensor | None = None,
    num_samples: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-mean VRAG loss (formula in the module docstring) and detached diagnostics.

    prior_scores, posterior_scores: (b, u) retriever scores over the candidate union.
    gen_logprobs: (b, u, t) per-token log p(y_t|x,z,y_<t) with ``mask`` (b, t), or (b, u)
    sequence log p(y|x,z). ``candidate_mask`` (b, u) bool marks real candidates when unions are
    padded. Diagnostics: expected_nll, kl, posterior_topk_mass (mass of the untruncated q on its
    top-K), prior_entropy, posterior_entropy (of q_K).
    """
    check_dims("prior_scores", prior_scores, 2)
    check_same_shape(("prior_scores", "posterior_scores"), prior_scores, posterior_scores)
    gen = gen_logprob_from_either("gen_logprobs", gen_logprobs, mask, length_normalize)  # (b, u)
    check_same_shape(("prior_scores", "gen_logprobs[:, :, 0]"), prior_scores, gen)
    if beta < 0:
        raise ValueError(f"beta: must be >= 0, got {beta}")
    if num_samples < 0:
        raise ValueError(f"num_samples: must be >= 0, got {num_samples}")

    log_p = torch.log_softmax(masked_scores(scaled_scores(prior_scores, temperature), candidate_mask), -1)
    post = masked_scores(scaled_scores(posterior_scores, temperature), candidate_mask)  # (b, u)
    log_q, in_topk = truncated_log_softmax(post, posterior_topk)  # (b, u)
    zero = torch.zeros((), dtype=gen.dtype, device=gen.device)
    # Off the top-K support every term is 0; torch.where keeps -inf * 0 out of values and grads.
    neg_gen = torch.where(in_topk, -gen, zero)  # (b, u)
    log_ratio = torch.where(in_topk, log_q - log_p, zero)  # (b, u)
    q = log_q.exp()  # (b, u), 0 off the support
    expected_nll = (q * neg_gen).sum(-1)  # (b,)
    kl = (q * log_ratio).sum(-1)  # (b,)
    if num_samples == 0:
        per_example = expected_nll + beta * kl  # (b,)
    else:
        per_example = _sampled_surrogate(log_q, neg_gen + beta * log_ratio, num_samples, generator)

    with torch.no_grad():
        topk_mass = (torch.softmax(post, -1) * in_topk).sum(-1)
    diagnostics = detached(
        expected_nll=expected_nll,
        kl=kl,
        posterior_topk_mass=topk_mass,
        prior_entropy=entropy(log_p),
        posterior_entropy=entropy(log_q),
    )
    return per_example.mean(), diagnostics
