"""RAG-Token (Lewis et al. 2020): every target token may come from a different passage.

    p(y | x) = prod_t sum_k p(z_k | x) p(y_t | x, z_k, y_<t)

The passage prior p(z|x) is the same at every position (it is not updated by the tokens so far).
"""

from __future__ import annotations

import torch

from raggen.objectives._common import detached, entropy, float_mask
from raggen.objectives.rag_sequence import _check


def rag_token_nll(doc_scores: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example RAG-Token NLL (**contract**).

        nll[b] = -sum_t mask[b, t] * logsumexp_k( log_softmax(doc_scores)[b, k] + token_logprobs[b, k, t] )

    Shapes as in ``rag_sequence_nll``: doc_scores (b, k), token_logprobs (b, k, t), mask (b, t);
    returns (b,). Equals transformers' ``RagTokenForGeneration.get_nll`` with epsilon 0.
    """
    _check(doc_scores, token_logprobs, mask)
    doc_logprobs = torch.log_softmax(doc_scores, dim=-1)  # (b, k)
    marginal = torch.logsumexp(doc_logprobs.unsqueeze(-1) + token_logprobs, dim=1)  # (b, t)
    return -(marginal * float_mask(mask, marginal)).sum(-1)  # (b,)


def rag_token_loss(
    doc_scores: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-mean RAG-Token NLL plus detached diagnostics (``nll``, ``prior_entropy``)."""
    nll = rag_token_nll(doc_scores, token_logprobs, mask)  # (b,)
    with torch.no_grad():
        prior_entropy = entropy(torch.log_softmax(doc_scores, dim=-1))
    return nll.mean(), detached(nll=nll, prior_entropy=prior_entropy)
