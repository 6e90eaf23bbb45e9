"""Training objectives of raggen: pure functions of tensors, one estimator per module.

Conventions: batch first; ``doc_scores``/``*_logits`` are retriever scores (softmaxed inside);
``token_logprobs[b, k, t]`` = log p(y_t | x, z_k, y_<t) of the target token with ``mask[b, t]``;
``seq_logprob[b, k]`` = log p(y | x, z_k). The ``*_nll`` contract functions return per-example
values (b,); every ``*_loss`` returns (batch-mean scalar loss, dict of detached 0-dim tensors).
"""

from raggen.objectives._common import scaled_scores, sequence_logprob
from raggen.objectives.emdr2 import emdr2_loss
from raggen.objectives.gumbel import (
    gumbel_noise,
    gumbel_rerank_loss,
    hard_topk_mask,
    passage_attention_bias,
    relaxed_topk_mask,
)
from raggen.objectives.jsa import (
    JSAChainCache,
    jsa_loss,
    jsa_mis_inputs,
    mis_sample,
    visited_mask,
)
from raggen.objectives.pdist import pdist_loss
from raggen.objectives.rag_sequence import rag_sequence_loss, rag_sequence_nll
from raggen.objectives.rag_token import rag_token_loss, rag_token_nll
from raggen.objectives.vrag import truncated_log_softmax, vrag_loss

__all__ = [
    "JSAChainCache",
    "emdr2_loss",
    "gumbel_noise",
    "gumbel_rerank_loss",
    "hard_topk_mask",
    "jsa_loss",
    "jsa_mis_inputs",
    "mis_sample",
    "passage_attention_bias",
    "pdist_loss",
    "rag_sequence_loss",
    "rag_sequence_nll",
    "rag_token_loss",
    "rag_token_nll",
    "relaxed_topk_mask",
    "scaled_scores",
    "sequence_logprob",
    "truncated_log_softmax",
    "visited_mask",
    "vrag_loss",
]
