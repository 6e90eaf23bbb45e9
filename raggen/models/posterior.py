"""The posterior retriever q(z | x, y): a query encoder that also reads the answer (VRAG, JSA-RAG)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from raggen.models.retriever import TextEncoder


def posterior_query_text(question: str, answer: str, sep: str) -> str:
    """``question [SEP] answer``: the posterior sees what the answer needs, to propose better passages."""
    return f"{question} {sep} {answer}"


class PosteriorRetriever(nn.Module):
    """Encodes ``question [SEP] answer`` into the passage index's vector space.

    It starts as a copy of the prior query encoder, so q(z|x,y) begins equal to p(z|x) up to the
    effect of the appended answer, and is trained jointly with it.
    """

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    @classmethod
    def from_query_encoder(cls, query_encoder: TextEncoder) -> PosteriorRetriever:
        """A deep copy: the two encoders share no parameters."""
        return cls(copy.deepcopy(query_encoder))

    @classmethod
    def from_pretrained(cls, name_or_path: str, **encoder_options: Any) -> PosteriorRetriever:
        """A bi-encoder checkpoint as q(z|x,y); ``encoder_options`` are ``TextEncoder.from_pretrained``'s."""
        return cls(TextEncoder.from_pretrained(name_or_path, **encoder_options))

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def sep(self) -> str:
        tok = self.encoder.tokenizer
        return tok.sep_token or tok.eos_token or "|"

    def texts(self, questions: list[str], answers: list[str]) -> list[str]:
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        return [posterior_query_text(q, a, self.sep) for q, a in zip(questions, answers)]

    def forward(self, questions: list[str], answers: list[str]) -> torch.Tensor:
        """(b, d) posterior query vectors, with grad."""
        return self.encoder(self.texts(questions, answers))

    def encode(self, questions: list[str], answers: list[str], batch_size: int = 64) -> torch.Tensor:
        """(b, d) float32 on CPU, no graph (index search)."""
        return self.encoder.encode(self.texts(questions, answers), batch_size=batch_size)

    def save_pretrained(self, path: str) -> None:
        self.encoder.save_pretrained(path)
