"""How passages are retrieved: dense (FAISS), sparse (BM25) or both fused (``retrieval`` in the config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RetrievalMode = Literal["dense", "sparse", "hybrid"]
RETRIEVAL_MODES: tuple[str, ...] = ("dense", "sparse", "hybrid")
Fusion = Literal["rrf", "weighted"]


class RetrievalSettings(BaseModel):
    """``retrieval`` (read by ``raggen eval``, ``retrieve`` and ``serve``; training keeps dense
    scores). ``sparse`` and ``hybrid`` need an index built with ``index.sparse: bm25``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: RetrievalMode = Field("dense", description="dense | sparse (BM25) | hybrid (both, fused)")
    # weighted is the default: on the benchmark's real text (README, "Retrieval modes") it matched or beat
    # BM25 and dense at recall@5 and @20 where RRF (k=60) fell below BM25 at recall@5
    fusion: Fusion = Field(
        "weighted", description="hybrid: weighted (min-max normalised scores) | rrf (reciprocal rank)"
    )
    rrf_k: float = Field(60.0, gt=0, description="rrf: the constant k in 1 / (k + rank)")
    dense_weight: float = Field(0.5, ge=0, le=1, description="hybrid: weight of the dense list; sparse gets 1 - it")
    candidates: int = Field(100, ge=1, description="hybrid: hits taken from each list before fusion (at least k)")
