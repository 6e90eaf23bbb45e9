"""EMDR² (Singh et al. 2021): end-to-end retriever training by expectation-maximisation.

Retriever term (the paper's): the top-K marginal likelihood with the reader's likelihoods held
fixed,

    L_retr = -log sum_k softmax(doc_scores)_k * stopgrad(p(y | x, z_k))

Its gradient w.r.t. doc_scores is softmax(doc_scores) - p(z | x, y), the exact posterior over the
K passages (the E-step's responsibilities).

Reader term. In the paper the reader is Fusion-in-Decoder and trains on its own NLL given all K
passages, -log p(y | x, z_1..K): pass that as ``reader_nll`` (b,). Without it we use the
M-step on the per-passage likelihoods, L_gen = -sum_k stopgrad(p(z_k | x, y)) log p(y | x, z_k)
(written as -log sum_k stopgrad(p(z_k|x)) p(y|x,z_k), which has that gradient); with this
default the summed gradient equals RAG-Sequence's, so EMDR² differs from RAG only through a FiD
reader.
"""

from __future__ import annotations

import torch

from raggen.objectives._common import check_dims, check_same_shape, detached, entropy


def emdr2_loss(
    doc_scores: torch.Tensor,
    seq_logprob: torch.Tensor,
    reader_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-mean L_retr + L_gen (module docstring) and detached diagnostics.

    doc_scores: (b, k) retriever scores; seq_logprob: (b, k) log p(y|x,z_k) with grad;
    reader_nll: optional (b,) FiD reader NLL. Diagnostics: retriever_loss, reader_loss,
    prior_entropy, posterior_entropy.
    """
    check_dims("doc_scores", doc_scores, 2)
    check_same_shape(("doc_scores", "seq_logprob"), doc_scores, seq_logprob)
    log_prior = torch.log_softmax(doc_scores, dim=-1)  # (b, k)
    retriever = -torch.logsumexp(log_prior + seq_logprob.detach(), dim=-1)  # (b,)
    if reader_nll is None:
        reader = -torch.logsumexp(log_prior.detach() + seq_logprob, dim=-1)  # (b,)
    else:
        if tuple(reader_nll.shape) != (doc_scores.shape[0],):
            raise ValueError(f"reader_nll: expected shape {(doc_scores.shape[0],)}, got {tuple(reader_nll.shape)}")
        reader = reader_nll
    with torch.no_grad():
        log_posterior = torch.log_softmax(log_prior + seq_logprob, dim=-1)
    diagnostics = detached(
        retriever_loss=retriever,
        reader_loss=reader,
        prior_entropy=entropy(log_prior.detach()),
        posterior_entropy=entropy(log_posterior),
    )
    return (retriever + reader).mean(), diagnostics
