"""Retrieval modes over a published index: dense (FAISS), sparse (BM25) or hybrid (rank fusion).

``fusion`` is pure numpy; ``hybrid.HybridIndex`` wraps a ``ShardedIndex`` and the version's BM25
index; ``settings.RetrievalSettings`` is the config's ``retrieval`` section."""

from raggen.retrieval.fusion import minmax_normalize, rrf_fuse, weighted_fuse
from raggen.retrieval.hybrid import HybridIndex, with_retrieval
from raggen.retrieval.settings import RETRIEVAL_MODES, RetrievalSettings

__all__ = [
    "HybridIndex",
    "RETRIEVAL_MODES",
    "RetrievalSettings",
    "minmax_normalize",
    "rrf_fuse",
    "weighted_fuse",
    "with_retrieval",
]
