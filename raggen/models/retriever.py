"""Bi-encoder text encoders: one HF encoder + pooling -> one vector per text, scored by inner product."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from raggen.models.loading import resolve_model_path

Pooling = Literal["cls", "mean"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(n, t, h), (n, t) -> (n, h). DPR uses CLS; sentence-transformers models use the masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (n, t, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


class TextEncoder(nn.Module):
    """An HF encoder with its tokenizer; ``forward(texts) -> (n, dim)`` keeps the graph for training."""

    def __init__(self, model: nn.Module, tokenizer, pooling: Pooling = "mean", max_length: int = 256):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        pooling: Pooling = "mean",
        max_length: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "TextEncoder":
        path = resolve_model_path(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype) if dtype else AutoModel.from_pretrained(path)
        encoder = cls(model, tokenizer, pooling=pooling, max_length=max_length)
        return encoder.to(device) if device is not None else encoder

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenize(texts)
        hidden = self.model(**batch).last_hidden_state  # (n, t, h)
        return pool(hidden, batch["attention_mask"], self.pooling)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Inference helper: (n, dim) float32 on CPU, in batches, no graph."""
        was_training = self.training
        self.eval()
        out = [self(texts[i : i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def passage_text(title: str, text: str, sep: str = " . ") -> str:
    """How a passage is shown to encoders and readers: DPR joins title and text."""
    return f"{title}{sep}{text}" if title else text
