"""Tiny stand-ins for the models a recipe names: the same classes at test size, built offline.

A real recipe names hub checkpoints (``facebook/dpr-ctx_encoder-single-nq-base``,
``facebook/bart-large``) that take GPUs and a download to load. Its dry run swaps each for a
random-init model *of the same class*, built from that class's HF config at tiny size with the
bundled BERT WordPiece tokenizer, so every code path the real run takes (class resolution, DPR's
pooler output and (title, text) pairs, seq2seq or causal decoding) runs on a CPU in seconds.

The class of a hub id is read from :data:`KNOWN_ARCHITECTURES` (no network here to ask the hub);
a local folder declares its own (``config.architectures``). An id that neither covers is an error:
the dry run must never rehearse a different class than the real run loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

from raggen.errors import ConfigError
from raggen.models.loading import declared_architecture, resolve_model_path
from raggen.models.retriever import save_pretrained_atomic
from raggen.models.tiny import (
    MAX_POSITIONS,
    PAD_ID,
    VOCAB_SIZE,
    make_tiny_encoder,
    make_tiny_generator,
    make_tiny_reranker,
    tiny_tokenizer,
)

#: hub id prefix -> the class its checkpoints declare (longest matching prefix wins)
KNOWN_ARCHITECTURES: dict[str, str] = {
    "facebook/dpr-ctx_encoder": "DPRContextEncoder",
    "facebook/dpr-question_encoder": "DPRQuestionEncoder",
    "facebook/bart-": "BartForConditionalGeneration",
    "t5-": "T5ForConditionalGeneration",
    "google-t5/": "T5ForConditionalGeneration",
    "google/flan-t5-": "T5ForConditionalGeneration",
    "google/t5-": "T5ForConditionalGeneration",
    "meta-llama/": "LlamaForCausalLM",
    "Qwen/Qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "openai-community/gpt2": "GPT2LMHeadModel",
    "sentence-transformers/": "BertModel",
    "BAAI/bge-small-en": "BertModel",
    "BAAI/bge-base-en": "BertModel",
    "BAAI/bge-large-en": "BertModel",
    "intfloat/e5-": "BertModel",
    "facebook/contriever": "BertModel",
    "bert-": "BertModel",
    "google-bert/": "BertModel",
    "cross-encoder/ms-marco-MiniLM": "BertForSequenceClassification",
}

TINY_DIM = 64  # every tiny encoder gives 64-d vectors, so query and passage stand-ins agree


def make_tiny_dpr_encoder(out_dir: str, side: str = "ctx", projection_dim: int = 0, seed: int = 0) -> str:
    """A random-init ``DPRContextEncoder`` (``side="ctx"``) or ``DPRQuestionEncoder`` (``"question"``);
    ``projection_dim > 0`` adds DPR's optional projection of the CLS state."""
    if side not in ("ctx", "question"):
        raise ValueError(f"side must be 'ctx' or 'question', got {side!r}")
    config = DPRConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TINY_DIM, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD_ID,
        projection_dim=projection_dim,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (DPRContextEncoder if side == "ctx" else DPRQuestionEncoder)(config)
    save_pretrained_atomic(out_dir, model, tiny_tokenizer())
    return out_dir


def _generator(kind: str) -> Callable[[str, int], str]:
    return lambda out, seed: make_tiny_generator(out, kind=kind, seed=seed)


#: architecture -> builder(out_dir, seed) of a tiny model of exactly that class
BUILDERS: dict[str, Callable[[str, int], str]] = {
    "DPRContextEncoder": lambda out, seed: make_tiny_dpr_encoder(out, "ctx", seed=seed),
    "DPRQuestionEncoder": lambda out, seed: make_tiny_dpr_encoder(out, "question", seed=seed),
    "BertModel": lambda out, seed: make_tiny_encoder(out, d_model=TINY_DIM, seed=seed),
    "BertForSequenceClassification": lambda out, seed: make_tiny_reranker(out, seed=seed),
    "BartForConditionalGeneration": _generator("bart"),
    "T5ForConditionalGeneration": _generator("t5"),
    "GPT2LMHeadModel": _generator("gpt2"),
    "LlamaForCausalLM": _generator("llama"),
    "Qwen2ForCausalLM": _generator("qwen2"),
}


def is_available_here(name_or_path: str) -> bool:
    """True when ``name_or_path`` loads without a download: a local folder, or the bundled MiniLM."""
    if "://" in name_or_path:
        return False
    return os.path.isdir(resolve_model_path(name_or_path))


def architecture_of(name_or_path: str) -> str:
    """The class ``name_or_path`` loads as: a local folder's declared class, or the known hub prefix's."""
    if os.path.isdir(os.path.expanduser(name_or_path)):
        arch = declared_architecture(os.path.expanduser(name_or_path))
        if arch is None:
            raise ConfigError(f"{name_or_path}: config.json declares no architectures")
        return arch
    matches = [prefix for prefix in KNOWN_ARCHITECTURES if name_or_path.startswith(prefix)]
    if not matches:
        raise ConfigError(
            f"{name_or_path}: no stand-in known for this hub id (known prefixes: {', '.join(sorted(KNOWN_ARCHITECTURES))}); "
            "save a tiny checkpoint of its class locally and point the config at it"
        )
    return KNOWN_ARCHITECTURES[max(matches, key=len)]


def make_stand_in(name_or_path: str, out_dir: str, seed: int = 0) -> str:
    """A tiny random model of the class ``name_or_path`` loads as, saved in ``out_dir``."""
    arch = architecture_of(name_or_path)
    if arch not in BUILDERS:
        raise ConfigError(f"{name_or_path}: class {arch} has no tiny stand-in (known: {', '.join(sorted(BUILDERS))})")
    return BUILDERS[arch](out_dir, seed)


__all__ = [
    "BUILDERS",
    "KNOWN_ARCHITECTURES",
    "TINY_DIM",
    "architecture_of",
    "is_available_here",
    "make_stand_in",
    "make_tiny_dpr_encoder",
]
