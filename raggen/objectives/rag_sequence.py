"""RAG-Sequence (Lewis et al. 2020): one passage explains the whole answer.

    p(y | x) = sum_k p(z_k | x) prod_t p(y_t | x, z_k, y_<t)

marginalised over the top-K retrieved passages. Gradients reach the retriever through
log_softmax(doc_scores) and the generator through every token log-prob.
"""

from __future__ import annotations

import torch

from raggen.objectives._common import check_dims, detached, entropy, sequence_logprob


def _check(doc_scores: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
    check_dims("doc_scores", doc_scores, 2)
    check_dims("token_logprobs", token_logprobs, 3)
    check_dims("mask", mask, 2)
    b, k = doc_scores.shape
    if tuple(token_logprobs.shape[:2]) != (b, k):
        raise ValueError(f"token_logprobs: expected (b={b}, k={k}, t), got {tuple(token_logprobs.shape)}")
    if tuple(mask.shape) != (b, token_logprobs.shape[2]):
        raise ValueError(f"mask: expected {(b, token_logprobs.shape[2])}, got {tuple(mask.shape)}")


def rag_sequence_nll(doc_scores: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example RAG-Sequence NLL (**contract**).

        nll[b] = -logsumexp_k( log_softmax(doc_scores)[b, k] + sum_t mask[b, t] * token_logprobs[b, k, t] )

    doc_scores: (b, k) retriever scores; token_logprobs: (b, k, t) log p(y_t | x, z_k, y_<t) of
    the target token; mask: (b, t), 1 for target tokens, 0 for padding. Returns nll: (b,).
    Equals transformers' ``RagSequenceForGeneration.get_nll`` with epsilon 0 on the same logits.
    """
    _check(doc_scores, token_logprobs, mask)
    doc_logprobs = torch.log_softmax(doc_scores, dim=-1)  # (b, k)
    seq_logprobs = sequence_logprob(token_logprobs, mask)  # (b, k)
    return -torch.logsumexp(doc_logprobs + seq_logprobs, dim=-1)  # (b,)


def rag_sequence_loss(
    doc_scores: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-mean RAG-Sequence NLL plus detached diagnostics.

    Diagnostics: ``nll``; ``prior_entropy`` of p(z|x) over the K passages; ``posterior_entropy``
    of p(z | x, y) ∝ p(z|x) p(y|x,z), which falls as one passage comes to explain the answer.
    """
    nll = rag_sequence_nll(doc_scores, token_logprobs, mask)  # (b,)
    with torch.no_grad():
        doc_logprobs = torch.log_softmax(doc_scores, dim=-1)
        joint = doc_logprobs + sequence_logprob(token_logprobs, mask)  # (b, k)
        posterior = torch.log_softmax(joint, dim=-1)
    diagnostics = detached(nll=nll, prior_entropy=entropy(doc_logprobs), posterior_entropy=entropy(posterior))
    return nll.mean(), diagnostics
