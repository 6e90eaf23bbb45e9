"""The reader: an HF seq2seq (BART, T5) or decoder-only (GPT-2, Llama, Qwen2 ...) LM scoring answers given passages.

The input format (source rows, chat prompts, targets and prefixes) is described and built in
:mod:`raggen.models.generator_inputs`; the decoding state that is computed once and reused by
every step (:class:`~raggen.models.generator_cache.EncodedRows`) in :mod:`raggen.models.generator_cache`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutput

from raggen.errors import ConfigError
from raggen.models.generator_cache import (
    EncodedRows,
    cross_attention_cache,
    full_attention_only,
    lm_head_on_last,
    prompt_cache,
)
from raggen.models.generator_inputs import (
    at_least_fp32,
    chat_prompt,
    chat_prompt_tail,
    chat_turn_end_id,
    check_batch,
    gather_logprobs,
    left_pad,
    source_text,
    target_mask,
)
from raggen.models.loading import load_pretrained_strict, resolve_model_path
from raggen.models.retriever import save_pretrained_atomic

NextLogprobs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _first_int(value) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


class Generator(nn.Module):
    """An HF LM with its tokenizer, exposing per-token log-likelihoods of targets given passages.

    ``forward`` is :meth:`token_logprobs` (or :meth:`fid_token_logprobs` with ``fid=True``), so a
    DDP-wrapped generator synchronises gradients.
    """

    def __init__(self, model: nn.Module, tokenizer, max_source_length: int = 256, max_target_length: int = 32):
        super().__init__()
        if max_target_length < 2:
            raise ValueError(f"max_target_length must be >= 2 (a token and EOS), got {max_target_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        #: decoder-only with a tokenizer chat template: prompts are chat turns (see generator_inputs)
        self.uses_chat_template = not self.is_encoder_decoder and bool(getattr(tokenizer, "chat_template", None))
        params = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in params
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._reuses_prompt = not self.is_encoder_decoder and full_attention_only(model.config)
        self._chat_tail = chat_prompt_tail(tokenizer) if self.uses_chat_template else []
        if len(self._chat_tail) >= max_source_length:
            raise ValueError(
                f"max_source_length ({max_source_length}) leaves no room for the question: the chat template "
                f"writes {len(self._chat_tail)} tokens after it"
            )
        self._init_special_ids()

    def _init_special_ids(self) -> None:
        sources = [getattr(self.model, "generation_config", None), self.model.config]

        def pick(name: str) -> int | None:
            for source in sources:
                value = _first_int(getattr(source, name, None)) if source is not None else None
                if value is not None:
                    return value
            return None

        def first_set(*values) -> int | None:
            return next((int(v) for v in values if v is not None), None)

        tok = self.tokenizer
        turn_end = chat_turn_end_id(tok) if self.uses_chat_template else None
        eos = first_set(turn_end, pick("eos_token_id"), tok.eos_token_id, tok.sep_token_id)
        if eos is None:
            raise ConfigError("generator: neither the model config nor the tokenizer defines an EOS token")
        pad = first_set(pick("pad_token_id"), tok.pad_token_id, eos)
        if tok.pad_token_id is None:  # GPT-2 tokenizers have none; padding needs one
            tok.pad_token_id = pad
        if self.is_encoder_decoder:
            start = first_set(pick("decoder_start_token_id"), pick("bos_token_id"), pad)
            forced = pick("forced_bos_token_id")
        else:
            start = first_set(pick("bos_token_id"), tok.bos_token_id, tok.cls_token_id, eos)
            forced = None
        self.bos_id: int = int(start)
        self.eos_id: int = int(eos)
        self.pad_id: int = int(pad)
        self.target_prefix: list[int] = [] if forced is None else [int(forced)]
        if self.max_target_length < len(self.target_prefix) + 2:
            raise ValueError(f"max_target_length must leave room for a token and EOS, got {self.max_target_length}")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        max_source_length: int = 256,
        max_target_length: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
    ) -> Generator:
        """Seq2seq or causal LM, decided by the config's ``is_encoder_decoder``.

        A checkpoint that leaves any weight newly initialised is a ConfigError naming the weights.
        """
        path = resolve_model_path(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise ConfigError(f"generator {name_or_path!r}: cannot load ({str(exc).splitlines()[0]})") from exc
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        kwargs = {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = load_pretrained_strict(
            role="generator", model_class=auto, path=path, name_or_path=name_or_path, **kwargs
        )
        on_cpu = device is None or torch.device(device).type == "cpu"
        if dtype is None and on_cpu and model.dtype in (torch.float16, torch.bfloat16):
            model = model.float()  # weights shipped in 16 bits (the quickstart reader) compute in fp32 on CPU
        generator = cls(model, tokenizer, max_source_length=max_source_length, max_target_length=max_target_length)
        return generator.to(device) if device is not None else generator

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Width of ``next_logprobs`` (the LM head, which may exceed the tokenizer's vocabulary)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    # ---- tokenisation -------------------------------------------------------------------------

    def tokenize_sources(self, questions: list[str], passages: list[list[str]]) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask (b*k, s) of every (question, passage) row, row = b*k + j.

        Decoder-only prompts are left-padded (whole chat prompts, assistant header included).
        """
        texts = [source_text(q, p) for q, group in zip(questions, passages) for p in group]
        if self.is_encoder_decoder:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_source_length, return_tensors="pt"
            )
            return {name: batch[name].to(self.device) for name in ("input_ids", "attention_mask")}
        if self.uses_chat_template:
            texts = [chat_prompt(self.tokenizer, text) for text in texts]
        rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        tail = self._chat_tail
        head = max(self.max_source_length - len(tail), 1)
        rows = [list(r) if len(r) <= self.max_source_length else list(r[:head]) + tail for r in rows]
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id)  # (b*k, p)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def tokenize_targets(self, targets: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets -> ids (b, t) = [forced bos] y_1..y_n eos, pad; mask (b, t) float, 1 on real tokens."""
        budget = self.max_target_length - 1 - len(self.target_prefix)
        tokenized = self.tokenizer(list(targets), add_special_tokens=False, truncation=True, max_length=budget)
        pieces = tokenized["input_ids"]
        rows = [self.target_prefix + list(ids) + [self.eos_id] for ids in pieces]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1.0
        return ids.to(self.device), mask.to(self.device)

    def decode(self, ids) -> str:
        """Token ids (with or without the start token) -> text, cut at the first EOS."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        return [self.decode(row) for row in ids]

    # ---- encoding -----------------------------------------------------------------------------

    def encode(self, questions: list[str], passages: list[list[str]]) -> EncodedRows:
        """Encode the b*k rows once (with grad): encoder states, or the prompts of a causal LM."""
        b, k = check_batch(questions, passages)
        batch = self.tokenize_sources(questions, passages)
        if not self.is_encoder_decoder:
            ids, mask = batch["input_ids"], batch["attention_mask"]  # (b*k, p), left-padded
            if not self.uses_chat_template:
                return EncodedRows(b, k, attention_mask=mask, prompt_ids=ids)
            # left padding: the last column is every row's last real token (the assistant header's end)
            return EncodedRows(b, k, attention_mask=mask[:, :-1], prompt_ids=ids[:, :-1], prompt_start=ids[:, -1:])
        hidden = self.model.get_encoder()(**batch).last_hidden_state  # (b*k, s, h)
        return EncodedRows(b, k, attention_mask=batch["attention_mask"], hidden=hidden, input_ids=batch["input_ids"])

    def fid_encode(
        self, questions: list[str], passages: list[list[str]], passage_log_mask: torch.Tensor | None = None
    ) -> EncodedRows:
        """Fusion-in-Decoder rows: each pair encoded alone, a question's k states concatenated.

        ``passage_log_mask[b, j]`` is added to every cross-attention logit on passage j, so the
        reader attends to it with weight proportional to ``M_j * exp(score)`` (G-Rerank).
        """
        if not self.is_encoder_decoder:
            raise ValueError("FiD reading needs an encoder-decoder generator (BART, T5); this one is decoder-only")
        rows = self.encode(questions, passages)
        b, k = rows.num_questions, rows.rows_per_question
        s, h = rows.hidden.shape[1], rows.hidden.shape[2]
        hidden = rows.hidden.reshape(b, k * s, h)  # (b, k*s, h)
        present = rows.attention_mask.reshape(b, k * s)  # (b, k*s)
        if passage_log_mask is None:
            return EncodedRows(b, 1, attention_mask=present, hidden=hidden)
        if tuple(passage_log_mask.shape) != (b, k):
            raise ValueError(f"passage_log_mask must be (b, k) = ({b}, {k}), got {tuple(passage_log_mask.shape)}")
        impl = getattr(self.model.config, "_attn_implementation", "eager")
        if impl not in ("eager", "sdpa"):
            raise ConfigError(f"generator: a passage mask needs attn_implementation 'eager' or 'sdpa', got {impl!r}")
        bias = passage_log_mask.to(device=hidden.device, dtype=hidden.dtype).repeat_interleave(s, dim=1)  # (b, k*s)
        floor = torch.finfo(hidden.dtype).min
        additive = torch.where(present.bool(), bias, torch.full_like(bias, floor))  # (b, k*s)
        return EncodedRows(b, 1, attention_mask=additive[:, None, None, :], hidden=hidden)

    # ---- scoring ------------------------------------------------------------------------------

    def _causal_inputs(self, encoded: EncodedRows, rows: torch.Tensor, decoder_ids: torch.Tensor, reuse: bool) -> dict:
        """Forward arguments of a decoder-only LM: prompt + decoder ids, or the decoder ids over the cached prompt."""
        if encoded.prompt_start is not None:  # chat prompts: their last token stands for [start]
            decoder_ids = torch.cat([encoded.prompt_start.index_select(0, rows), decoder_ids[:, 1:]], dim=1)
        mask = encoded.attention_mask.index_select(0, rows)  # (n, p)
        full_mask = torch.cat([mask, torch.ones_like(decoder_ids)], dim=1)  # (n, p + t)
        if reuse and self._reuses_prompt and mask.shape[1] > 0:
            t = decoder_ids.shape[1]
            steps = torch.arange(t, device=self.device)
            return {
                "input_ids": decoder_ids,
                "attention_mask": full_mask,
                "position_ids": mask.sum(-1, keepdim=True) + steps,  # (n, t): after each row's real prompt tokens
                self._cache_arg: prompt_cache(
                    self.model, encoded, rows, cache_arg=self._cache_arg, keeps_logits=self._keeps_logits
                ),
                "use_cache": True,
            }
        return {
            "input_ids": torch.cat([encoded.prompt_ids.index_select(0, rows), decoder_ids], dim=1),
            "attention_mask": full_mask,
            "position_ids": (full_mask.cumsum(-1) - 1).clamp(min=0),  # left padding: real tokens from 0
            "use_cache": False,
        }

    def _decoder_logits(
        self, encoded: EncodedRows, rows: torch.Tensor, decoder_ids: torch.Tensor, keep: int, reuse_cache: bool = False
    ) -> torch.Tensor:
        """Logits (n, keep, v) at the last ``keep`` positions of ``decoder_ids`` (n, t) = [start] ....

        ``reuse_cache`` (decoding, no grad) takes the passages' keys/values from
        :func:`~raggen.models.generator_cache.cross_attention_cache` or
        :func:`~raggen.models.generator_cache.prompt_cache` instead of recomputing them.
        """
        rows = rows.to(device=self.device, dtype=torch.long)
        if rows.dim() != 1 or rows.shape[0] != decoder_ids.shape[0]:
            shapes = f"{tuple(rows.shape)}, {tuple(decoder_ids.shape)}"
            raise ValueError(f"rows must be (n,) matching prefixes (n, t); got {shapes}")
        if self.is_encoder_decoder:
            hidden = encoded.hidden.index_select(0, rows)  # (n, s, h)
            inputs = {
                "encoder_outputs": BaseModelOutput(last_hidden_state=hidden),
                "attention_mask": encoded.attention_mask.index_select(0, rows),
                "decoder_input_ids": decoder_ids,
                "use_cache": False,
            }
            if reuse_cache:
                cache = cross_attention_cache(
                    self.model, encoded, rows, start_id=self.bos_id, cache_arg=self._cache_arg
                )
                inputs.update({self._cache_arg: cache, "use_cache": True})
        else:
            inputs = self._causal_inputs(encoded, rows, decoder_ids, reuse_cache)
        with lm_head_on_last(self.model, keep, self._keeps_logits) as extra:
            out = self.model(**inputs, **extra)
        return out.logits[:, -keep:]

    def _target_logprobs(
        self, encoded: EncodedRows, rows: torch.Tensor, target_ids: torch.Tensor, reuse_cache: bool = False
    ) -> torch.Tensor:
        """Teacher forcing: (n, t) log p(target_t | x, z, target_<t), unmasked."""
        target_ids = target_ids.to(device=self.device, dtype=torch.long)
        start = torch.full_like(target_ids[:, :1], self.bos_id)
        decoder_ids = torch.cat([start, target_ids[:, :-1]], dim=1)  # (n, t)
        logits = self._decoder_logits(encoded, rows, decoder_ids, keep=target_ids.shape[1], reuse_cache=reuse_cache)
        return gather_logprobs(logits, target_ids)

    def token_logprobs(
        self, questions: list[str], passages: list[list[str]], targets: list[str], encoded: EncodedRows | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(y_t | x_b, z_bk, y_<t) as (b, k, t), 0 on padding, and the target mask (b, t).

        One batched forward over the b*k rows, with grad; float32 (float64 for a float64 model).
        ``encoded``: ``self.encode(questions, passages)`` when the caller also uses the encoder states.
        """
        b, k = check_batch(questions, passages, targets)
        encoded = self.encode(questions, passages) if encoded is None else encoded
        target_ids, mask = self.tokenize_targets(targets)  # (b, t)
        rows = torch.arange(b * k, device=self.device)
        logprobs = self._target_logprobs(encoded, rows, target_ids.repeat_interleave(k, dim=0))  # (b*k, t)
        logprobs = logprobs.view(b, k, -1) * mask.unsqueeze(1)  # (b, k, t)
        return logprobs, mask

    def fid_token_logprobs(
        self,
        questions: list[str],
        passages: list[list[str]],
        targets: list[str],
        passage_log_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(y_t | x_b, z_b1..z_bk, y_<t) as (b, t) (0 on padding) and the mask (b, t).

        The decoder cross-attends to all k passages at once (FiD); see :meth:`fid_encode`.
        """
        b, _ = check_batch(questions, passages, targets)
        encoded = self.fid_encode(questions, passages, passage_log_mask)
        target_ids, mask = self.tokenize_targets(targets)  # (b, t)
        logprobs = self._target_logprobs(encoded, torch.arange(b, device=self.device), target_ids)  # (b, t)
        return logprobs * mask, mask

    def forward(
        self,
        questions: list[str],
        passages: list[list[str]],
        targets: list[str],
        fid: bool = False,
        passage_log_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if fid:
            return self.fid_token_logprobs(questions, passages, targets, passage_log_mask)
        if passage_log_mask is not None:
            raise ValueError("passage_log_mask only applies to FiD reading (fid=True)")
        return self.token_logprobs(questions, passages, targets)

    # ---- decoding -----------------------------------------------------------------------------

    def next_logprobs(self, encoded: EncodedRows, rows: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        """(n, v) log p(next | x, z_row, prefix) for prefixes (n, t) = [start] y_1..y_{t-1}.

        Recomputes the decoder over the prefix (no self-attention cache of the answer), so beams may
        be reordered freely; without grad, the passages' keys/values (cross-attention, or the prompt
        of a decoder-only LM) are computed once per ``encoded``.
        """
        prefixes = prefixes.to(device=self.device, dtype=torch.long)
        if prefixes.dim() != 2 or prefixes.shape[1] < 1:
            raise ValueError(f"prefixes must be (n, t >= 1) starting with bos_id, got {tuple(prefixes.shape)}")
        reuse = not torch.is_grad_enabled()
        logits = self._decoder_logits(encoded, rows, prefixes, keep=1, reuse_cache=reuse)[:, -1]  # (n, v)
        return torch.log_softmax(at_least_fp32(logits), dim=-1)

    def step_fn(self, encoded: EncodedRows) -> NextLogprobs:
        """``next_logprobs(rows, prefixes)`` bound to ``encoded``, without grad, for beam searches."""

        def next_logprobs(rows: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.next_logprobs(encoded, rows, prefixes)

        return next_logprobs

    def sequence_logprob(self, encoded: EncodedRows, rows: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """(n,) log p(y | x, z_row) of targets (n, t) = y_1..y_n eos [pad...], without the start token.

        Tokens after the first EOS are ignored, so finished beam hypotheses can be passed as is
        (after dropping their start column). Keeps the graph; under no_grad (decoding) it reuses
        the passages' keys/values as :meth:`next_logprobs` does.
        """
        target_ids = target_ids.to(device=self.device, dtype=torch.long)
        mask = target_mask(target_ids, self.eos_id, self.pad_id)  # (n, t)
        reuse = not torch.is_grad_enabled()
        return (self._target_logprobs(encoded, rows, target_ids, reuse_cache=reuse) * mask).sum(-1)

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """Atomic HF folder; ``dtype=torch.float16`` halves the file (for shipping) and leaves this model as it is."""
        model = self.model if dtype is None else copy.deepcopy(self.model).to(dtype)
        save_pretrained_atomic(path, model, self.tokenizer)
