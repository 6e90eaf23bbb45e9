"""A BART reader whose encoder is a pretrained BERT-style encoder (e.g. the bundled MiniLM-L6).

A small BART from scratch, pre-trained on a few thousand batches of fresh facts, settles into a
language model of answers that ignores the passage (``raggen.train.reader.passage_reliance`` ~ 0).
BART's encoder layer is BERT's layer (post-LN self-attention + GELU feed-forward), so a pretrained
encoder maps onto it weight for weight: the reader then starts with contextual token states and
token embeddings that mean something, shared with the decoder and the output layer, and only the
decoder (cross-attention included) has to learn to find and copy the answer.

The mapping is exact up to LayerNorm epsilon: ``tests/unit/test_models_warm_start.py`` checks the
BART encoder's output against the BERT encoder's.
"""

from __future__ import annotations

import torch
from transformers import AutoModel, BartConfig, BartForConditionalGeneration

from raggen.models.loading import resolve_model_path
from raggen.models.retriever import save_pretrained_atomic

# The BERT vocabulary's [PAD], [CLS], [SEP]: BART's pad, decoder start and eos here.
PAD_ID, BOS_ID, EOS_ID = 0, 101, 102


def _bert_layer_to_bart(bert_layer, bart_layer) -> None:
    att, out = bert_layer.attention, bert_layer.output
    pairs = [
        (bart_layer.self_attn.q_proj, att.self.query),
        (bart_layer.self_attn.k_proj, att.self.key),
        (bart_layer.self_attn.v_proj, att.self.value),
        (bart_layer.self_attn.out_proj, att.output.dense),
        (bart_layer.self_attn_layer_norm, att.output.LayerNorm),
        (bart_layer.fc1, bert_layer.intermediate.dense),
        (bart_layer.fc2, out.dense),
        (bart_layer.final_layer_norm, out.LayerNorm),
    ]
    for dst, src in pairs:
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)


def bart_config_for(bert_config, encoder_layers: int, decoder_layers: int, decoder_heads: int | None) -> BartConfig:
    """A BART config whose encoder has the BERT encoder's shapes."""
    if bert_config.hidden_act not in ("gelu", "relu"):
        raise ValueError(f"encoder activation {bert_config.hidden_act!r} has no BART equivalent")
    return BartConfig(
        vocab_size=bert_config.vocab_size,
        d_model=bert_config.hidden_size,
        encoder_layers=encoder_layers,
        encoder_attention_heads=bert_config.num_attention_heads,
        encoder_ffn_dim=bert_config.intermediate_size,
        decoder_layers=decoder_layers,
        decoder_attention_heads=decoder_heads or bert_config.num_attention_heads,
        decoder_ffn_dim=bert_config.intermediate_size,
        activation_function=bert_config.hidden_act,
        max_position_embeddings=bert_config.max_position_embeddings,
        dropout=0.1,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_bos_token_id=None,
        forced_eos_token_id=EOS_ID,
        scale_embedding=False,
        tie_word_embeddings=True,
    )


@torch.no_grad()
def bart_from_bert_encoder(
    encoder_name_or_path: str,
    out_dir: str,
    *,
    encoder_layers: int | None = None,
    decoder_layers: int = 2,
    decoder_heads: int | None = None,
    seed: int = 0,
) -> str:
    """Save (atomically) a BART with the encoder's embeddings and its first ``encoder_layers``
    layers, a randomly initialised ``decoder_layers``-layer decoder, and the encoder's tokenizer.

    BERT adds a token-type embedding that BART lacks; type 0 (the only one a single segment uses)
    is folded into the position table. BART's learned positions are offset by 2.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(encoder_name_or_path)
    bert = AutoModel.from_pretrained(path)
    if bert.config.model_type not in ("bert", "roberta", "xlm-roberta"):
        raise ValueError(f"{encoder_name_or_path}: expected a BERT-style encoder, got {bert.config.model_type!r}")
    n_layers = encoder_layers or bert.config.num_hidden_layers
    if not 1 <= n_layers <= bert.config.num_hidden_layers:
        raise ValueError(f"encoder_layers must be in [1, {bert.config.num_hidden_layers}], got {n_layers}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bart = BartForConditionalGeneration(bart_config_for(bert.config, n_layers, decoder_layers, decoder_heads))
    emb = bert.embeddings
    bart.model.shared.weight.copy_(emb.word_embeddings.weight)  # tied: encoder, decoder, lm_head
    positions = emb.position_embeddings.weight + emb.token_type_embeddings.weight[0]
    bart.model.encoder.embed_positions.weight[2 : 2 + positions.shape[0]].copy_(positions)
    bart.model.encoder.layernorm_embedding.weight.copy_(emb.LayerNorm.weight)
    bart.model.encoder.layernorm_embedding.bias.copy_(emb.LayerNorm.bias)
    for i in range(n_layers):
        _bert_layer_to_bart(bert.encoder.layer[i], bart.model.encoder.layers[i])
    gen = bart.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    gen.decoder_start_token_id, gen.forced_bos_token_id = BOS_ID, None
    tokenizer = AutoTokenizer.from_pretrained(path, model_input_names=["input_ids", "attention_mask"])
    save_pretrained_atomic(out_dir, bart, tokenizer)
    return out_dir
