"""Bi-encoder text encoders: one HF encoder + pooling -> one vector per text, scored by inner product."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Literal

import torch
import torch.nn.functional as F
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


def save_pretrained_atomic(path: str, *parts) -> None:
    """``save_pretrained`` every part (model, tokenizer) into a temp folder, then swap it in.

    A crash mid-save leaves the previous folder (or nothing), never a half-written model.
    """
    target = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        for part in parts:
            part.save_pretrained(tmp)
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class TextEncoder(nn.Module):
    """An HF encoder with its tokenizer; ``forward(texts) -> (n, dim)`` keeps the graph for training.

    ``normalize=True`` L2-normalises the pooled vectors, as sentence-transformers' MiniLM was trained
    (inner product = cosine); DPR encoders are used unnormalised.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        pooling: Pooling = "mean",
        max_length: int = 256,
        normalize: bool = False,
    ):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        self.max_length = max_length
        self.normalize = normalize

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        pooling: Pooling = "mean",
        max_length: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        normalize: bool = False,
    ) -> "TextEncoder":
        path = resolve_model_path(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype) if dtype else AutoModel.from_pretrained(path)
        encoder = cls(model, tokenizer, pooling=pooling, max_length=max_length, normalize=normalize)
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
        vectors = pool(hidden, batch["attention_mask"], self.pooling)  # (n, h)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Inference helper: (n, dim) float32 on CPU, in batches, no graph."""
        was_training = self.training
        self.eval()
        out = [self(texts[i : i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def save_pretrained(self, path: str) -> None:
        save_pretrained_atomic(path, self.model, self.tokenizer)


def inner_product_scores(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """(b, d), (b, k, d) -> (b, k): the retriever score <q_b, d_bk> of each candidate."""
    if queries.dim() != 2 or passages.dim() != 3 or passages.shape[0] != queries.shape[0]:
        raise ValueError(
            f"expected queries (b, d) and passages (b, k, d), got {tuple(queries.shape)} and {tuple(passages.shape)}"
        )
    if passages.shape[-1] != queries.shape[-1]:
        raise ValueError(f"dims differ: queries {queries.shape[-1]}, passages {passages.shape[-1]}")
    return torch.einsum("bd,bkd->bk", queries, passages)


class BiEncoder(nn.Module):
    """A query encoder and a passage encoder scored by inner product (DPR).

    The passage encoder is frozen in most recipes (the index holds its vectors); pass the same
    TextEncoder twice to share weights.
    """

    def __init__(self, query_encoder: TextEncoder, passage_encoder: TextEncoder):
        super().__init__()
        if query_encoder.dim != passage_encoder.dim:
            raise ValueError(f"query dim {query_encoder.dim} != passage dim {passage_encoder.dim}")
        self.query_encoder = query_encoder
        self.passage_encoder = passage_encoder

    @classmethod
    def from_pretrained(
        cls,
        query_name_or_path: str,
        passage_name_or_path: str | None = None,
        pooling: Pooling = "mean",
        max_length: int = 256,
        normalize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "BiEncoder":
        """``passage_name_or_path=None`` shares one encoder for both sides."""
        kwargs = dict(pooling=pooling, max_length=max_length, normalize=normalize, device=device, dtype=dtype)
        query = TextEncoder.from_pretrained(query_name_or_path, **kwargs)
        passage = query if passage_name_or_path is None else TextEncoder.from_pretrained(passage_name_or_path, **kwargs)
        return cls(query, passage)

    @property
    def dim(self) -> int:
        return self.query_encoder.dim

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        """(n, d) with grad."""
        return self.query_encoder(texts)

    def encode_passages(self, texts: list[str]) -> torch.Tensor:
        """(n, d) with grad (wrap in no_grad when the passage side is frozen)."""
        return self.passage_encoder(texts)

    @staticmethod
    def score(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """(b, d), (b, k, d) -> (b, k) inner products."""
        return inner_product_scores(queries, passages)

    def forward(self, questions: list[str], passages: list[list[str]]) -> torch.Tensor:
        """Scores (b, k) of each question against its own k passages, both sides with grad."""
        if len(questions) != len(passages):
            raise ValueError(f"{len(questions)} questions but {len(passages)} passage lists")
        k = len(passages[0]) if passages else 0
        for row, group in enumerate(passages):
            if len(group) != k:
                raise ValueError(f"passages[{row}] has {len(group)} passages, passages[0] has {k}")
        q = self.encode_queries(questions)  # (b, d)
        d = self.encode_passages([p for group in passages for p in group]).view(len(passages), k, -1)  # (b, k, d)
        return self.score(q, d)


def passage_text(title: str, text: str, sep: str = " . ") -> str:
    """How a passage is shown to encoders and readers: DPR joins title and text."""
    return f"{title}{sep}{text}" if title else text
