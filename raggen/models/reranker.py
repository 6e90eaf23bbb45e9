"""Cross-encoder reranker: one relevance score per (question, passage) pair, read jointly by a BERT-style model."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from raggen.errors import ConfigError
from raggen.models.generator_inputs import check_batch
from raggen.models.loading import load_pretrained_strict, resolve_model_path
from raggen.models.retriever import save_pretrained_atomic


class Reranker(nn.Module):
    """``forward(questions, passages[b][c]) -> (b, c)`` scores with grad (G-Rerank trains it end to end).

    The score is the single logit of an ``AutoModelForSequenceClassification`` (num_labels=1) on
    the pair ``[CLS] question [SEP] passage [SEP]``; only the scores' order and differences matter.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256):
        super().__init__()
        if int(getattr(model.config, "num_labels", 1)) != 1:
            raise ConfigError(f"reranker: expected a single-logit model (num_labels=1), got {model.config.num_labels}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        max_length: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        new_head: bool = False,
    ) -> Reranker:
        """Loads a single-logit cross-encoder; any weight the checkpoint lacks is a ConfigError.
        ``new_head=True`` starts a fresh classification head on a plain encoder (to train it, as
        G-Rerank does), and only the head may be missing then."""
        path = resolve_model_path(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise ConfigError(f"reranker {name_or_path!r}: cannot load ({str(exc).splitlines()[0]})") from exc
        kwargs = {"num_labels": 1}
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = load_pretrained_strict(
            "reranker",
            AutoModelForSequenceClassification,
            path,
            name_or_path,
            allow_new=("classifier.", "score.") if new_head else (),
            **kwargs,
        )
        reranker = cls(model, tokenizer, max_length=max_length)
        return reranker.to(device) if device is not None else reranker

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, questions: list[str], passages: list[list[str]]) -> dict[str, torch.Tensor]:
        """The b*c pairs (row = b*c + j), truncated from the longer side to ``max_length``."""
        firsts = [q for q, group in zip(questions, passages) for _ in group]
        seconds = [p for group in passages for p in group]
        batch = self.tokenizer(
            firsts, seconds, padding=True, truncation="longest_first", max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, questions: list[str], passages: list[list[str]]) -> torch.Tensor:
        """(b, c) float32 scores, one batched pass over the b*c pairs."""
        b, c = check_batch(questions, passages)
        logits = self.model(**self.tokenize(questions, passages)).logits  # (b*c, 1)
        return logits.float().view(b, c)

    @torch.no_grad()
    def score(self, questions: list[str], passages: list[list[str]], batch_size: int = 16) -> torch.Tensor:
        """Inference helper: (b, c) float32 on CPU, ``batch_size`` questions at a time, no graph."""
        was_training = self.training
        self.eval()
        out = [
            self(questions[i : i + batch_size], passages[i : i + batch_size]).cpu()
            for i in range(0, len(questions), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out)

    def save_pretrained(self, path: str) -> None:
        save_pretrained_atomic(path, self.model, self.tokenizer)
