"""Models of raggen: bi-encoder retrievers, the posterior retriever, the reader and the reranker.

All load through transformers' Auto classes from an HF id or a local folder (``resolve_model_path``)
and save with ``save_pretrained`` (safetensors + tokenizer); ``tiny`` builds test-size checkpoints.

Names load on first use (PEP 562): every Ray worker imports this package, and a worker that needs
only the bi-encoder should not pay for importing the generator families and the tiny-model builders.
"""

from __future__ import annotations

from raggen.lazy import lazy_exports

_HOMES = {
    "Generator": "generator",
    "EncodedRows": "generator_cache",
    "SOURCE_TEMPLATE": "generator_inputs",
    "check_batch": "generator_inputs",
    "gather_logprobs": "generator_inputs",
    "source_text": "generator_inputs",
    "target_mask": "generator_inputs",
    "MINILM_ID": "loading",
    "bundled_minilm_path": "loading",
    "resolve_model_path": "loading",
    "PosteriorRetriever": "posterior",
    "posterior_query_text": "posterior",
    "Reranker": "reranker",
    "BiEncoder": "retriever",
    "TextEncoder": "retriever",
    "inner_product_scores": "retriever",
    "passage_text": "passage_input",
    "pool": "retriever",
    "save_pretrained_atomic": "retriever",
    "make_tiny_encoder": "tiny",
    "make_tiny_generator": "tiny",
    "make_tiny_reranker": "tiny",
    "tiny_tokenizer": "tiny",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)


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
