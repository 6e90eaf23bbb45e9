"""The shard's passage parquet: building, writing (atomically) and reading its embeddings.

One file per shard: ``row_id`` int64 (the FAISS id), ``id`` string (passage id),
``title``, ``text``, and optionally ``embedding`` fixed_size_list<float32>[dim]. Embeddings are
stored because training recomputes doc scores q(x)·d(z) with gradient to the query encoder and
needs d(z) for the retrieved passages. Their cost is dim * 4 bytes per passage (768-d: 3 KiB;
21M DPR passages: ~64 GB, versus ~13 GB of text). Publish with ``store_embeddings=False`` to
drop them; readers then fall back to FAISS ``reconstruct`` (exact for Flat/HNSW, approximate
for PQ/SQ codes).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raggen.storage import AtomicFile


def passages_table(
    row_ids: np.ndarray,
    ids: list[str] | np.ndarray,
    titles: list[str] | np.ndarray,
    texts: list[str] | np.ndarray,
    embeddings: np.ndarray | None = None,
) -> pa.Table:
    """The shard's passage table; ``embeddings`` (n, d) float32 becomes a fixed_size_list column."""
    columns = {
        "row_id": pa.array(np.asarray(row_ids, dtype=np.int64)),
        "id": pa.array([str(x) for x in ids], type=pa.string()),
        "title": pa.array([("" if x is None else str(x)) for x in titles], type=pa.string()),
        "text": pa.array([("" if x is None else str(x)) for x in texts], type=pa.string()),
    }
    if embeddings is not None:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        assert emb.ndim == 2 and emb.shape[0] == len(columns["row_id"]), f"embeddings: bad shape {emb.shape}"
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
    return pa.table(columns)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write through :class:`raggen.storage.AtomicFile` (readers never see a half-written file)."""
    with AtomicFile(path, "wb", compress=False) as f:
        pq.write_table(table, f)


def embeddings_of(table: pa.Table) -> np.ndarray | None:
    """(n, d) float32 view of the ``embedding`` column, or None when it was not stored."""
    if "embedding" not in table.column_names:
        return None
    col = table.column("embedding").combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # empty tables stay chunked
        col = col.chunks[0] if col.num_chunks else pa.array([], type=col.type)
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), dim).astype(np.float32, copy=False)
