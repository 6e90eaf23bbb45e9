"""What the reader reads: the source text of a (question, passage) row, batch checks, chat
prompts, padding and target masks (:class:`~raggen.models.generator.Generator` builds on these).

Input format (one row per (question, passage) pair; ``x`` = ``"question: {q} context: {passage}"``):

* encoder-decoder: the encoder reads ``x`` (with the tokenizer's own special tokens); the decoder
  reads ``[start] y_1 .. y_n`` and predicts ``y_1 .. y_n [eos]``.
* decoder-only, tokenizer without a chat template (the documented default): the model reads ``x``
  (no special tokens) followed by ``[start] y_1 .. y_n`` and predicts ``y_1 .. y_n [eos]``.
* decoder-only, tokenizer with a ``chat_template``: the prompt is
  ``tokenizer.apply_chat_template([{"role": "user", "content": x}], tokenize=False,
  add_generation_prompt=True)`` tokenised without adding special tokens (the template writes its
  own), so it ends with the assistant header. No BOS is put before the answer, as chat models are
  trained: the prompt's last token takes the place of ``[start]`` (the ``[start]`` column of a
  prefix is a placeholder for it), and ``[eos]`` is the special token the template closes an
  assistant turn with (Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``), else the model's EOS.

Decoder-only prompts are left-padded and never scored; one longer than ``max_source_length``
loses the end of its passage (a chat prompt keeps its closing assistant header). Positions count
real tokens only, so padding changes nothing.

``[start]`` is :attr:`Generator.bos_id` (the decoder start token, or the LM's BOS). A *target* is
``y_1 .. y_n [eos]`` right-padded with :attr:`pad_id`; for BART checkpoints whose generation config
forces a BOS (``facebook/bart-large``), ``y_1`` is that forced token, as HF fine-tunes them.
A *prefix* in decoding is ``[start] y_1 .. y_t``: ``next_logprobs`` on it scores ``y_{t+1}``, so
teacher forcing and step-wise decoding agree token for token.
"""

from __future__ import annotations

import torch

SOURCE_TEMPLATE = "question: {question} context: {passage}"
# stands in for the user text when a chat template is rendered to find what it writes after it
_CONTENT_MARK = "RAGGENCONTENTMARK"


def source_text(question: str, passage: str) -> str:
    """The text the reader sees for one (question, passage) pair."""
    return SOURCE_TEMPLATE.format(question=question, passage=passage)


def check_batch(questions: list[str], passages: list[list[str]], targets: list[str] | None = None) -> tuple[int, int]:
    """(b, k) of a rectangular batch; a ragged or mistyped one is refused with the row named."""
    b = len(questions)
    if b == 0:
        raise ValueError("empty batch: no questions")
    if len(passages) != b:
        raise ValueError(f"{b} questions but {len(passages)} passage lists")
    if targets is not None and len(targets) != b:
        raise ValueError(f"{b} questions but {len(targets)} targets")
    k = len(passages[0])
    if k == 0:
        raise ValueError("passages[0] is empty: every question needs at least one passage")
    for row, group in enumerate(passages):
        if isinstance(group, str) or len(group) != k:
            raise ValueError(f"passages[{row}] must be a list of {k} strings (as passages[0]), got {group!r:.80}")
        for col, passage in enumerate(group):
            if not isinstance(passage, str):
                raise ValueError(f"passages[{row}][{col}] must be a str, got {type(passage).__name__}")
    return b, k


def target_mask(target_ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """(n, t) ids -> (n, t) float mask: 1 up to and including the first EOS, 0 for padding after it.

    Works when pad == eos (GPT-2) because only the first EOS counts.
    """
    is_eos = target_ids == eos_id  # (n, t)
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS strictly before t
    keep = (eos_before == 0) & ((target_ids != pad_id) | is_eos)
    return keep.to(torch.float32)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast before a softmax over the vocabulary; fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(n, t, v) logits, (n, t) ids -> (n, t) log-softmax of each id, in at least float32."""
    return torch.log_softmax(at_least_fp32(logits), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as the user turn of the tokenizer's chat template, ending with the assistant header."""
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt_tail(tokenizer) -> list[int]:
    """Ids the chat template writes after the user text (kept when a long prompt is cut)."""
    rendered = chat_prompt(tokenizer, _CONTENT_MARK)
    if _CONTENT_MARK not in rendered:
        return []
    return list(tokenizer(rendered.split(_CONTENT_MARK, 1)[1], add_special_tokens=False)["input_ids"])


def chat_turn_end_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with, or None.

    Llama 3 generation configs list ``<|end_of_text|>`` first, but its answers end with ``<|eot_id|>``.
    """
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _CONTENT_MARK}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates may refuse this conversation; fall back to the model's EOS
        return None
    if _CONTENT_MARK not in rendered:
        return None
    after = tokenizer(rendered.split(_CONTENT_MARK, 1)[1].lstrip(), add_special_tokens=False)["input_ids"]
    if not after:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(after[0])
    special = after[0] in tokenizer.all_special_ids or bool(added is not None and added.special)
    return int(after[0]) if special else None


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> ids (n, p) left-padded with ``pad_id``, mask (n, p) 1 on real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask
