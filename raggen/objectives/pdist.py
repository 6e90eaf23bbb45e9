"""Perplexity distillation (PDist; Atlas, Izacard et al. 2022): train the retriever to match
how much each passage helps the language model.

    L_retr = KL( stopgrad softmax(seq_logprob / lm_temperature) || softmax(doc_scores / retriever_temperature) )

seq_logprob[b, k] = log p(y | x, z_k) (the LM's answer log-likelihood given passage k alone).
Only the retriever gets gradient from this term. The reader trains on its own loss, passed in
as ``reader_nll`` (b,) (Atlas: the FiD reader's NLL) and added to the total.
"""

from __future__ import annotations

import torch

from raggen.objectives._common import check_dims, check_same_shape, check_temperature, detached, entropy


def pdist_loss(
    doc_scores: torch.Tensor,
    seq_logprob: torch.Tensor,
    reader_nll: torch.Tensor | None = None,
    *,
    lm_temperature: float = 1.0,
    retriever_temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-mean KL(target || retriever) (+ mean reader_nll) and detached diagnostics.

    doc_scores, seq_logprob: (b, k). Diagnostics: kl, target_entropy, retriever_entropy.
    """
    check_dims("doc_scores", doc_scores, 2)
    check_same_shape(("doc_scores", "seq_logprob"), doc_scores, seq_logprob)
    check_temperature(lm_temperature)
    check_temperature(retriever_temperature)
    log_target = torch.log_softmax(seq_logprob.detach() / lm_temperature, dim=-1)  # (b, k)
    log_retr = torch.log_softmax(doc_scores / retriever_temperature, dim=-1)  # (b, k)
    kl = (log_target.exp() * (log_target - log_retr)).sum(-1)  # (b,)
    total = kl
    values = {"kl": kl, "target_entropy": entropy(log_target), "retriever_entropy": entropy(log_retr.detach())}
    if reader_nll is not None:
        if tuple(reader_nll.shape) != (doc_scores.shape[0],):
            raise ValueError(f"reader_nll: expected shape {(doc_scores.shape[0],)}, got {tuple(reader_nll.shape)}")
        total = total + reader_nll
        values["reader_loss"] = reader_nll
    return total.mean(), detached(**values)
