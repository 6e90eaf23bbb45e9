"""Gumbel reranking (G-Rerank, arXiv 2502.11116): train a reranker through a relaxed top-k mask.

Flow. The reranker scores w_i = R(q, d_i) of the retrieved candidates become a soft mask
M = relaxed_topk_mask(w, k, tau) (b, c). The reader sees every passage separately
(Fusion-in-Decoder: each (question, passage) encoded alone, the decoder cross-attends to all) and
``passage_attention_bias(M)`` = log(M + eps) is added to its cross-attention logits on every
token of passage i, i.e. attention weight ∝ M_i * exp(score). The loss is the reader's LM loss
on the answer (``gumbel_rerank_loss``), so gradients reach the reranker through M. By default
only the reranker trains (the reader frozen). Inference uses ``hard_topk_mask`` (no noise).
"""

from __future__ import annotations

import torch

from raggen.objectives._common import check_dims, detached, sequence_logprob

_TINY = torch.finfo(torch.float32).tiny


def gumbel_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples, -log(-log U), with U kept away from 0 and 1."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    u = u.clamp(min=_TINY, max=1.0 - torch.finfo(dtype).eps)
    return -torch.log(-torch.log(u))


def relaxed_topk_mask(
    scores: torch.Tensor,
    k: int,
    tau: float,
    generator: torch.Generator | None = None,
    method: str = "subset",
    *,
    kappa: float = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gumbel-perturbed relaxed top-k mask (**contract**), differentiable in ``scores``.

    scores: (b, c); returns mask (b, c) with values >= 0.
    ``method="subset"``: relaxed subset sampling; with g = scores + G, k successive softmaxes
    a_j = softmax(g_j / tau), g_{j+1} = g_j + log(1 - a_j) (the chosen mass removed); mask =
    sum_j a_j, so each row sums to k (single entries may exceed 1 at large tau). As tau -> 0 it
    is the hard top-k of scores + G, i.e. k passages drawn without replacement in proportion
    to exp(score). ``noise``: G (b, c).
    ``method="max"``: the G-Rerank paper's relaxed top-k sampling: k independent Gumbel-softmax
    draws softmax((kappa * scores + G_j) / tau), combined by element-wise max (as in L2X); as
    tau -> 0 it is the 0/1 indicator of the union of the k draws' argmaxes. ``noise``: (k, b, c).
    """
    check_dims("scores", scores, 2)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k: must be in [1, {scores.shape[1]}] (the number of candidates), got {k}")
    if not tau > 0:
        raise ValueError(f"tau: must be > 0, got {tau}")
    if method == "subset":
        return _subset_mask(scores, k, tau, generator, noise)
    if method == "max":
        return _max_mask(scores, k, tau, kappa, generator, noise)
    raise ValueError(f"method: expected 'subset' or 'max', got {method!r}")


def _check_noise(noise: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
    return noise


def _subset_mask(scores, k, tau, generator, noise) -> torch.Tensor:
    shape = tuple(scores.shape)
    g = _check_noise(noise, shape) if noise is not None else gumbel_noise(shape, generator, scores.device, scores.dtype)
    logits = scores + g  # (b, c)
    mask = torch.zeros_like(scores)
    onehot = torch.zeros_like(scores)
    for _ in range(k):
        logits = logits + torch.log((1.0 - onehot).clamp_min(_TINY))  # remove the chosen mass
        onehot = torch.softmax(logits / tau, dim=-1)  # (b, c)
        mask = mask + onehot
    return mask


def _max_mask(scores, k, tau, kappa, generator, noise) -> torch.Tensor:
    shape = (k, *scores.shape)
    g = _check_noise(noise, shape) if noise is not None else gumbel_noise(shape, generator, scores.device, scores.dtype)
    draws = torch.softmax((kappa * scores.unsqueeze(0) + g) / tau, dim=-1)  # (k, b, c)
    return draws.max(dim=0).values  # (b, c)


def hard_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The inference-time mask: 1.0 on each row's top-k scores, 0.0 elsewhere (b, c)."""
    check_dims("scores", scores, 2)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k: must be in [1, {scores.shape[1]}], got {k}")
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores).scatter_(1, idx, 1.0)


def passage_attention_bias(
    mask: torch.Tensor, eps: float = 1e-6, tokens_per_passage: int | None = None
) -> torch.Tensor:
    """log(mask + eps): the additive cross-attention bias that turns weights into M_i * exp(score).

    mask: (b, k) -> (b, k); with ``tokens_per_passage=L`` the bias is repeated over each
    passage's L encoder tokens, (b, k * L), matching a FiD decoder's concatenated memory.
    ``eps`` keeps masked-out passages at a finite bias (log eps) instead of -inf.
    """
    check_dims("mask", mask, 2)
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    bias = torch.log(mask + eps)  # (b, k)
    if tokens_per_passage is None:
        return bias
    if tokens_per_passage < 1:
        raise ValueError(f"tokens_per_passage: must be >= 1, got {tokens_per_passage}")
    return bias.repeat_interleave(tokens_per_passage, dim=1)  # (b, k * L)


def gumbel_rerank_loss(
    answer_token_logprobs: torch.Tensor,
    answer_mask: torch.Tensor,
    passage_mask: torch.Tensor | None = None,
    *,
    length_normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reader's answer NLL under the soft mask, batch mean, and detached diagnostics.

        loss = mean_b -sum_t answer_mask[b, t] * answer_token_logprobs[b, t]

    answer_token_logprobs: (b, t) log p(y_t | x, z_1..K weighted by M, y_<t) from the FiD reader
    run with ``passage_attention_bias(M)``; the mask's gradient arrives through them.
    passage_mask: the soft mask M (b, k), only for diagnostics: mask_hardness (mean distance of
    M from {0, 1}, 0 = hard) and mask_max.
    """
    check_dims("answer_token_logprobs", answer_token_logprobs, 2)
    nll = -sequence_logprob(answer_token_logprobs, answer_mask, length_normalize=length_normalize)  # (b,)
    values: dict[str, torch.Tensor] = {"nll": nll}
    if passage_mask is not None:
        check_dims("passage_mask", passage_mask, 2)
        m = passage_mask.detach().clamp(0.0, 1.0)
        values["mask_hardness"] = torch.minimum(m, 1.0 - m)
        values["mask_max"] = m.max(-1).values
    return nll.mean(), detached(**values)
