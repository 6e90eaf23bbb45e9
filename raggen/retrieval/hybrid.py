"""Dense, sparse or hybrid search over one index version: :class:`HybridIndex` wraps the version's
``ShardedIndex`` and its BM25 index (``raggen.index.sparse``) and fuses their hits
(:mod:`raggen.retrieval.fusion`). Passages of sparse hits are fetched from the dense shards."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from raggen.errors import ConfigError
from raggen.index.sharded import SearchResult, ShardedIndex
from raggen.index.sparse import SparseIndex, load_sparse
from raggen.retrieval.fusion import rrf_fuse, weighted_fuse
from raggen.retrieval.settings import RETRIEVAL_MODES, RetrievalSettings


class HybridIndex:
    """``search(xq, k, questions=..., mode=...)`` -> SearchResult by ``mode`` (default: the
    settings'): dense (FAISS scores), sparse (BM25 scores) or hybrid (fused scores)."""

    def __init__(
        self, dense: ShardedIndex, sparse: SparseIndex | None, settings: RetrievalSettings, *, where: str = "the index"
    ):
        self.dense, self.sparse, self.settings, self.where = dense, sparse, settings, where
        self.check_mode(settings.mode)

    @property
    def version(self) -> str:
        return self.dense.version

    @property
    def manifest(self):
        return self.dense.manifest

    @property
    def dim(self) -> int:
        return self.dense.dim

    @property
    def num_passages(self) -> int:
        return self.dense.num_passages

    def close(self, **kwargs: Any) -> None:
        self.dense.close(**kwargs)

    def __getattr__(self, name: str) -> Any:  # backend_kind, actor_group, ...: the dense index's
        if name in ("dense", "sparse", "settings", "where"):
            raise AttributeError(name)
        return getattr(self.dense, name)

    def check_mode(self, mode: str) -> str:
        if mode not in RETRIEVAL_MODES:
            raise ConfigError(f"retrieval: one of {', '.join(RETRIEVAL_MODES)}, got {mode!r}")
        if mode != "dense" and self.sparse is None:
            raise ConfigError(
                f"retrieval.mode: {mode!r} needs a sparse index, but version {self.version} of "
                f"{self.where} has none (build it with index.sparse: bm25)"
            )
        return mode

    def search(
        self,
        xq: np.ndarray | None,
        k: int,
        *,
        questions: list[str] | None = None,
        mode: str | None = None,
        embeddings: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine_k_factor: float | None = None,
        settings: RetrievalSettings | None = None,
    ) -> SearchResult:
        """Top-``k`` per query; ``xq`` (b, d) query vectors (unused by sparse), ``questions`` the
        texts (unused by dense); ``settings`` (default: this index's) for this call's fusion."""
        s = settings or self.settings
        mode = self.check_mode(mode or s.mode)
        params = {"nprobe": nprobe, "ef_search": ef_search, "refine_k_factor": refine_k_factor}
        if mode == "dense":
            return self.dense.search(xq, k, **params, embeddings=embeddings)
        assert questions is not None, "sparse / hybrid search needs the questions' text"
        if mode == "sparse":
            scores, rows = self.sparse.search(list(questions), k)  # (b, k) each
            return self.dense.fetch(rows, self.sparse.shard_of(rows), scores, embeddings=embeddings)
        c = max(int(k), s.candidates)
        dense = self.dense.search(xq, c, **params, embeddings=False)
        sparse_scores, sparse_rows = self.sparse.search(list(questions), c)
        weights = (s.dense_weight, 1.0 - s.dense_weight)
        if s.fusion == "rrf":
            rows, scores = rrf_fuse([dense.row_ids, sparse_rows], k, rrf_k=s.rrf_k, weights=weights)
        else:
            rows, scores = weighted_fuse([dense.row_ids, sparse_rows], [dense.scores, sparse_scores], k, weights)
        return self.dense.fetch(rows, self.sparse.shard_of(rows), scores, embeddings=embeddings)


def with_retrieval(
    index: ShardedIndex,
    uri: str,
    settings: RetrievalSettings,
    *,
    s3_options: Mapping[str, Any] | None = None,
    cache_dir=None,
    load_sparse_index: bool | None = None,
) -> HybridIndex:
    """``index`` (a ShardedIndex opened from ``uri``) with its version's sparse index, loaded and
    verified when the settings' mode needs it (``load_sparse_index=True``: whenever the version has
    one, e.g. for per-request modes). A mode the version cannot serve is a ConfigError."""
    load = settings.mode != "dense" if load_sparse_index is None else load_sparse_index
    try:
        sparse = load_sparse(uri, index.version, s3_options=s3_options, cache_dir=cache_dir) if load else None
        return HybridIndex(index, sparse, settings, where=uri)
    except BaseException:
        index.close()  # e.g. the shard actors it started
        raise
