"""Top-k lists and their payloads, merged exactly across shards or shard actors. numpy only.

``merge_topk`` merges per-shard (scores, row ids[, shard numbers]) lists; ``fill_hits`` attaches
the passages fetched for them (the one place a payload is assembled); ``merge_hits`` merges lists
that already carry their payloads (a shard actor's answer), with the same order and tie-breaking
as ``merge_topk``, so one round trip to the actors gives the same result as search-then-fetch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Hits:
    """Top-k per query with payloads, best first: what a shard actor returns for a query batch.
    ``shards``: global shard numbers (-1: no hit, whose id/title/text are ''); ``embeddings``:
    the stored vectors (b, k, d), None when they were not asked for (nothing sent)."""

    scores: np.ndarray  # (b, k) float32, higher is better
    row_ids: np.ndarray  # (b, k) int64
    shards: np.ndarray  # (b, k) int64
    ids: list[list[str]]
    titles: list[list[str]]
    texts: list[list[str]]
    embeddings: np.ndarray | None  # (b, k, d) float32


def topk_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Columns (b, min(k, n)) of the k best of (b, n) scores; ties keep column order (stable)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _take(a: np.ndarray, order: np.ndarray, k: int, fill) -> np.ndarray:
    """``a`` (b, n[, d]) gathered at ``order`` (b, m) along axis 1, padded with ``fill`` to k columns.
    Fancy indexing, not ``np.take_along_axis``: the same gather, without its ~10 us of index set-up
    per call (a single query's search through 4 shard actors merges 5 times)."""
    out = a[np.arange(len(order))[:, None], order]
    if out.shape[1] < k:  # fewer hits than k in total
        pad = np.full((out.shape[0], k - out.shape[1], *out.shape[2:]), fill, dtype=out.dtype)
        out = np.concatenate([out, pad], 1)
    return out


def merge_topk(per_shard: list[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[(scores (b, k_s), ids (b, k_s)[, shard (b, k_s)])] -> scores (b, k), ids (b, k), shard (b, k);
    higher is better. Without a shard array, part n's hits come from shard n; with one (a shard
    actor's own merge of its shards) its numbers are kept.

    Ties keep part order (stable sort), like a single index that holds the shards back to back.
    """
    scores = np.concatenate([p[0] for p in per_shard], axis=1)  # (b, S*k)
    ids = np.concatenate([p[1] for p in per_shard], axis=1)  # (b, S*k)
    shard = np.concatenate([p[2] if len(p) > 2 else np.full(p[1].shape, n, dtype=np.int64)
                            for n, p in enumerate(per_shard)], axis=1)  # fmt: skip
    order = topk_order(scores, k)
    top_ids = _take(ids, order, k, -1)
    top_shard = np.where(top_ids >= 0, _take(shard, order, k, -1), -1)  # a shard's "no hit" is no one's
    return _take(scores, order, k, -np.inf), top_ids, top_shard


def requests_of(row_ids: np.ndarray, shards: np.ndarray) -> dict[int, np.ndarray]:
    """{shard number: its row ids (n,), in row-major order of (b, k) ``row_ids``}; -1 entries skipped."""
    return {int(s): row_ids[shards == s] for s in np.unique(shards) if s >= 0}


def fill_hits(
    scores: np.ndarray,
    row_ids: np.ndarray,
    shards: np.ndarray,
    fetched: dict[int, tuple],
    *,
    embeddings: bool,
    dim: int,
) -> Hits:
    """Hits of (b, k) ``scores`` / ``row_ids`` / ``shards`` with the payloads ``fetched`` for
    ``requests_of(row_ids, shards)``: {shard: (ids, titles, texts, vectors (n, d) or None)}."""
    b, k = row_ids.shape
    hits = Hits(
        scores=scores,
        row_ids=row_ids,
        shards=shards,
        ids=[[""] * k for _ in range(b)],
        titles=[[""] * k for _ in range(b)],
        texts=[[""] * k for _ in range(b)],
        embeddings=np.zeros((b, k, dim), np.float32) if embeddings else None,
    )
    for s, (pids, titles, texts, emb) in fetched.items():
        rows, cols = np.nonzero(shards == s)  # same row-major order as row_ids[shards == s]
        if emb is not None and hits.embeddings is not None:
            hits.embeddings[rows, cols] = emb
        for j, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
            hits.ids[r][c], hits.titles[r][c], hits.texts[r][c] = pids[j], titles[j], texts[j]
    return hits


def merge_hits(parts: list[Hits], k: int) -> Hits:
    """The exact top-k of several Hits (e.g. one per shard actor, in actor order) with their
    payloads: the same winners and ties as ``merge_topk`` over the parts' (scores, ids, shards)."""
    scores = np.concatenate([p.scores for p in parts], axis=1)
    order = topk_order(scores, k)
    row_ids = _take(np.concatenate([p.row_ids for p in parts], axis=1), order, k, -1)
    shards = np.where(row_ids >= 0, _take(np.concatenate([p.shards for p in parts], axis=1), order, k, -1), -1)

    def pick(field: str) -> list[list[str]]:
        out = []
        for r, cols in enumerate(order.tolist()):
            row = [x for p in parts for x in getattr(p, field)[r]]
            out.append([row[c] for c in cols] + [""] * (k - len(cols)))
        return out

    embs = [p.embeddings for p in parts]
    return Hits(
        scores=_take(scores, order, k, -np.inf),
        row_ids=row_ids,
        shards=shards,
        ids=pick("ids"),
        titles=pick("titles"),
        texts=pick("texts"),
        embeddings=None if any(e is None for e in embs) else _take(np.concatenate(embs, axis=1), order, k, 0.0),
    )
