"""The reader's decoding state: :class:`EncodedRows` and the caches built from it.

Decoding (no grad) computes the passages' keys/values once per :class:`EncodedRows`: the
cross-attention of an encoder-decoder, the prompt of a decoder-only LM (full-attention models;
sliding-window ones recompute the prompt). Each step then runs the model over the prefix only,
from a fresh cache of the chosen rows, so beams may be reordered or duplicated freely.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput


def full_attention_only(config) -> bool:
    """Every layer caches all past keys (no sliding window), so a cached prompt can be reused as is."""
    try:
        return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)
    except Exception:  # a config this transformers cannot size a cache for: recompute the prompt
        return False


@dataclass
class EncodedRows:
    """Reader inputs encoded once and reused by every decoding step.

    Rows are ``b * k + j`` for question b and passage j (``rows_per_question = k``); FiD rows hold
    one question each with its k passages' encoder states concatenated.
    """

    num_questions: int
    rows_per_question: int
    attention_mask: torch.Tensor  # (n, s) 0/1, or (n, 1, 1, s) additive float (FiD with a passage mask)
    hidden: torch.Tensor | None = None  # (n, s, h) encoder outputs (encoder-decoder models)
    input_ids: torch.Tensor | None = None  # (n, s) the token ids ``hidden`` was computed from
    prompt_ids: torch.Tensor | None = None  # (n, p) left-padded prompts (decoder-only models)
    # (n, 1) chat prompts only: each prompt's last token, read in place of [start] (prompt_ids
    # and attention_mask then hold the tokens before it)
    prompt_start: torch.Tensor | None = None
    # per decoder layer (n, heads, s, head_dim) cross-attention keys and values, filled by the
    # first decoding step so later steps skip re-projecting the encoder states of every beam
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    # per layer (n, kv_heads, p, head_dim) keys and values of prompt_ids (decoder-only models),
    # filled by the first decoding step so later steps run over the answer prefix only
    prompt_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        return int(self.attention_mask.shape[0])


@contextlib.contextmanager
def lm_head_on_last(model: nn.Module, keep: int, keeps_logits: bool):
    """Apply the LM head to the last ``keep`` positions only (seq2seq forwards lack logits_to_keep).

    Decoding needs one position out of t; the full (n, t, vocab) product would dominate a step.
    """
    if keeps_logits:
        yield {"logits_to_keep": keep}
        return
    head = model.get_output_embeddings()

    def slice_input(module, args):
        if not args:  # called with keywords: leave it whole, the caller slices the logits
            return None
        return (args[0][:, -keep:],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(slice_input)
    try:
        yield {}
    finally:
        handle.remove()


def cross_attention_cache(
    model: nn.Module, encoded: EncodedRows, rows: torch.Tensor, *, start_id: int, cache_arg: str
) -> EncoderDecoderCache:
    """A cache holding only the cross-attention keys/values of ``rows``, computed once per ``encoded``.

    No gradient flows through it: decoding only.
    """
    if encoded.cross_kv is None:
        with torch.no_grad():
            device = next(model.parameters()).device
            start = torch.full((encoded.num_rows, 1), start_id, dtype=torch.long, device=device)
            out = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoded.hidden),
                attention_mask=encoded.attention_mask,
                decoder_input_ids=start,
                use_cache=True,
            )
        layers = out[cache_arg].cross_attention_cache.layers
        encoded.cross_kv = [(layer.keys.contiguous(), layer.values.contiguous()) for layer in layers]
    cross = [(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in encoded.cross_kv]
    return EncoderDecoderCache(DynamicCache(), DynamicCache(cross))


def prompt_cache(
    model: nn.Module, encoded: EncodedRows, rows: torch.Tensor, *, cache_arg: str, keeps_logits: bool
) -> DynamicCache:
    """A fresh cache of the prompt keys/values of ``rows``, the prompts run once per ``encoded``.

    Fresh per call because a DynamicCache grows in place. No gradient flows through it: decoding only.
    """
    if encoded.prompt_kv is None:
        mask = encoded.attention_mask  # (n, p)
        with torch.no_grad(), lm_head_on_last(model, 1, keeps_logits) as extra:
            out = model(
                input_ids=encoded.prompt_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # left padding: real tokens from 0
                use_cache=True,
                **extra,
            )
        layers = out[cache_arg].layers
        encoded.prompt_kv = [(layer.keys.contiguous(), layer.values.contiguous()) for layer in layers]
    chosen = [(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in encoded.prompt_kv]
    return DynamicCache(chosen)
