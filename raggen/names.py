"""The vocabularies that several packages share, each defined once: a ``Literal`` for type checkers
and pydantic, and the tuple derived from it for runtime checks and CLI choices. No imports beyond
``typing``, so the lightest module (the HTTP schemas, the CLI parser) can use them."""

from __future__ import annotations

from typing import Literal, get_args

EstimatorName = Literal["rag-sequence", "rag-token", "vrag", "jsa", "emdr2", "pdist", "gumbel-rerank"]
ESTIMATORS: tuple[str, ...] = get_args(EstimatorName)

DecodingName = Literal["rag-token", "rag-sequence-fast", "rag-sequence-thorough"]
DECODINGS: tuple[str, ...] = get_args(DecodingName)
