"""Small shared pieces of the estimators: input checks, sequence log-likelihoods, temperatures.

Kept here (not in each estimator) so every estimator reads its inputs the same way:
``token_logprobs[..., t]`` is log p(y_t | x, z, y_<t) of the *target* token and ``mask[b, t]``
marks the target positions that count (1) versus padding (0).
"""

from __future__ import annotations

import torch


def check_dims(name: str, tensor: torch.Tensor, dims: int) -> None:
    """Raise ValueError naming ``name`` when ``tensor`` is not a ``dims``-dimensional tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims, got shape {tuple(tensor.shape)}")


def check_same_shape(names: tuple[str, ...], *tensors: torch.Tensor) -> None:
    """Raise ValueError when the tensors do not all share one shape."""
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes[1:]):
        listed = ", ".join(f"{n}{s}" for n, s in zip(names, shapes))
        raise ValueError(f"shape mismatch: {listed}")


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")


def scaled_scores(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``scores / temperature``: the retriever temperature (the official JSA-RAG code uses 0.1)."""
    check_temperature(temperature)
    return scores if temperature == 1.0 else scores / temperature


def float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A {0, 1} mask (bool or numeric) as ``like``'s float dtype."""
    return mask.to(dtype=like.dtype)


def sequence_logprob(token_logprobs: torch.Tensor, mask: torch.Tensor, length_normalize: bool = False) -> torch.Tensor:
    """log p(y | x, z) from per-token log-probs: the masked sum over t (or the masked mean).

    token_logprobs: (b, k, t) or (b, t); mask: (b, t). Returns (b, k) or (b,).
    ``length_normalize=True`` divides by the number of target tokens, as the official JSA-RAG
    code does; it is then a per-token average and no longer a log-likelihood.
    """
    if token_logprobs.dim() not in (2, 3):
        raise ValueError(f"token_logprobs: expected (b, k, t) or (b, t), got {tuple(token_logprobs.shape)}")
    check_dims("mask", mask, 2)
    b, t = token_logprobs.shape[0], token_logprobs.shape[-1]
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"mask: expected shape {(b, t)}, got {tuple(mask.shape)}")
    m = float_mask(mask, token_logprobs)  # (b, t)
    if token_logprobs.dim() == 3:
        m = m.unsqueeze(1)  # (b, 1, t)
    total = (token_logprobs * m).sum(-1)  # (b, k) or (b,)
    if not length_normalize:
        return total
    lengths = m.sum(-1).clamp_min(1.0)  # (b, 1) or (b,)
    return total / lengths


def gen_logprob_from_either(
    name: str, gen_logprobs: torch.Tensor, mask: torch.Tensor | None, length_normalize: bool
) -> torch.Tensor:
    """Accept per-token log-probs (b, u, t) with a mask, or sequence log-probs (b, u)."""
    if gen_logprobs.dim() == 3:
        if mask is None:
            raise ValueError(f"{name}: per-token log-probs (b, u, t) need a mask (b, t)")
        return sequence_logprob(gen_logprobs, mask, length_normalize=length_normalize)
    if gen_logprobs.dim() == 2:
        if length_normalize:
            raise ValueError(f"{name}: length_normalize needs per-token log-probs (b, u, t) and a mask")
        return gen_logprobs
    raise ValueError(f"{name}: expected (b, u, t) or (b, u), got shape {tuple(gen_logprobs.shape)}")


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy along the last dim of a normalised log-distribution; -inf entries count as 0."""
    p = logprobs.exp()
    return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1)


def masked_scores(scores: torch.Tensor, candidate_mask: torch.Tensor | None) -> torch.Tensor:
    """Scores with invalid (padding) candidates set to -inf, so softmaxes give them zero mass.

    The union of prior and posterior top-Ks has a different size per example; callers pad it to
    C and pass ``candidate_mask[b, c] = False`` for padding slots.
    """
    if candidate_mask is None:
        return scores
    if tuple(candidate_mask.shape) != tuple(scores.shape):
        raise ValueError(f"candidate_mask: expected shape {tuple(scores.shape)}, got {tuple(candidate_mask.shape)}")
    if not bool(candidate_mask.any(-1).all()):
        raise ValueError("candidate_mask: every example needs at least one valid candidate")
    return scores.masked_fill(~candidate_mask.bool(), float("-inf"))


def detached(**values: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """Diagnostics as 0-dim detached float tensors (cheap to all-reduce, never in the graph)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in values.items():
        t = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        t = t if t.is_floating_point() else t.float()
        out[key] = t.mean() if t.dim() > 0 else t
    return out
