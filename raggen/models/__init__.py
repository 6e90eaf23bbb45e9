"""Models of raggen: bi-encoder retrievers, the posterior retriever, the reader and the reranker.

All load through transformers' Auto classes from an HF id or a local folder (``resolve_model_path``)
and save with ``save_pretrained`` (safetensors + tokenizer); ``tiny`` builds test-size checkpoints.
"""

from raggen.models.generator import Generator
from raggen.models.generator_cache import EncodedRows
from raggen.models.generator_inputs import SOURCE_TEMPLATE, check_batch, gather_logprobs, source_text, target_mask
from raggen.models.loading import MINILM_ID, bundled_minilm_path, resolve_model_path
from raggen.models.posterior import PosteriorRetriever, posterior_query_text
from raggen.models.reranker import Reranker
from raggen.models.retriever import (
    BiEncoder,
    TextEncoder,
    inner_product_scores,
    passage_text,
    pool,
    save_pretrained_atomic,
)
from raggen.models.tiny import make_tiny_encoder, make_tiny_generator, make_tiny_reranker, tiny_tokenizer

__all__ = [
    "MINILM_ID",
    "SOURCE_TEMPLATE",
    "BiEncoder",
    "EncodedRows",
    "Generator",
    "PosteriorRetriever",
    "Reranker",
    "TextEncoder",
    "bundled_minilm_path",
    "check_batch",
    "gather_logprobs",
    "inner_product_scores",
    "make_tiny_encoder",
    "make_tiny_generator",
    "make_tiny_reranker",
    "passage_text",
    "pool",
    "posterior_query_text",
    "resolve_model_path",
    "save_pretrained_atomic",
    "source_text",
    "target_mask",
    "tiny_tokenizer",
]
