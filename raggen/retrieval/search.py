"""The one retrieve-and-format path: query vectors (or questions and a query encoder) -> top-k
passages of a published index -> what the reader reads. The training step, evaluation, Serve and
``raggen retrieve`` / ``raggen index search`` all call these, so a change to how passages are
searched or shown reaches every one of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from raggen.errors import ConfigError
from raggen.index.settings import SearchSettings
from raggen.index.sharded import SearchResult
from raggen.models.passage_input import passage_text
from raggen.retrieval.hybrid import HybridIndex
from raggen.retrieval.settings import RetrievalSettings

Hit = dict[str, Any]  # {"id", "title", "text", "score"}: one passage of evidence


def search_passages(
    index: Any,
    xq: np.ndarray | None,
    k: int,
    *,
    questions: list[str] | None = None,
    mode: str | None = None,
    settings: RetrievalSettings | None = None,
    embeddings: bool = False,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine_k_factor: float | None = None,
) -> SearchResult:
    """Top-``k`` per query. A ``HybridIndex`` searches by ``mode`` (default: its settings'), which
    needs the ``questions``' text for sparse and hybrid; any other index is dense only.
    ``embeddings``: also return each hit's stored vector (training scores with them)."""
    params = {"nprobe": nprobe, "ef_search": ef_search, "refine_k_factor": refine_k_factor, "embeddings": embeddings}
    if isinstance(index, HybridIndex):
        return index.search(xq, k, questions=questions, mode=mode, settings=settings, **params)
    if mode not in (None, "dense"):
        raise ConfigError(f"retrieval.mode: {mode!r} needs the version's sparse index; this index searches dense only")
    return index.search(xq, k, **params)


def encode_and_search(query_encoder: Any, index: Any, questions: list[str], k: int, **options: Any) -> SearchResult:
    """``search_passages`` with the questions encoded by ``query_encoder`` (no grad: the caller's
    training step encodes with grad itself and calls ``search_passages``)."""
    questions = list(questions)
    prefix = query_encoder.query_prefix_for(index.manifest.encoder.query_prefix)  # the index's unless the encoder's own
    xq = query_encoder.encode(questions, prefix=prefix).numpy()  # (b, d) float32
    return search_passages(index, xq, k, questions=questions, **options)


def search_index(
    uri: str,
    questions: list[str],
    k: int = 5,
    *,
    encoder_name_or_path: str | None = None,
    pooling: str | None = None,
    query_prefix: str | None = None,
    max_length: int = 64,
    version: str | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine_k_factor: float | None = None,
    settings: SearchSettings | None = None,
    s3_options: Mapping[str, Any] | None = None,
    start_ray: bool = False,
) -> SearchResult:
    """``raggen index search``: open a published version, encode ``questions`` with the encoder the
    manifest records (its pooling, normalisation and query prompt; ``encoder_name_or_path`` /
    ``pooling`` / ``query_prefix`` override) and search it once; ``nprobe`` / ``ef_search`` /
    ``refine_k_factor`` override the settings' and the version's defaults."""
    from raggen.index import open_index
    from raggen.models.retriever import TextEncoder

    index = open_index(
        uri, version, settings=settings, s3_options=s3_options, load_embeddings=False, start_ray=start_ray
    )
    try:
        enc = index.manifest.encoder
        encoder = TextEncoder.from_pretrained(
            encoder_name_or_path or enc.name_or_path,
            pooling=pooling or enc.pooling,
            max_length=max_length,
            normalize=enc.normalize,
            query_prefix=query_prefix,  # None: the manifest's (encode_and_search)
        )
        params = {"nprobe": nprobe, "ef_search": ef_search, "refine_k_factor": refine_k_factor}
        return encode_and_search(encoder, index, list(questions), k, **params)
    finally:
        index.close()


def reader_passages(result: SearchResult) -> list[list[str]]:
    """Each hit as the reader and a re-encoding passage encoder see it (``passage_text``)."""
    return [[passage_text(t, x) for t, x in zip(tr, xr)] for tr, xr in zip(result.titles, result.texts)]


def hits(result: SearchResult, top_ks: list[int]) -> list[list[Hit]]:
    """The first ``top_ks[i]`` real hits of row ``i`` as evidence dicts (an index holding fewer
    than k passages pads with row id -1: left out)."""
    out = []
    for i, k in enumerate(top_ks):
        row = []
        for j in range(min(k, result.row_ids.shape[1])):
            if result.row_ids[i, j] < 0:
                continue
            row.append(
                {
                    "id": str(result.ids[i][j]),
                    "title": str(result.titles[i][j]),
                    "text": str(result.texts[i][j]),
                    "score": float(result.scores[i][j]),
                }
            )
        out.append(row)
    return out
