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


def one_chunk(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The column as one contiguous Array (the chunk itself when there is one)."""
    if isinstance(column, pa.Array):
        return column
    if column.num_chunks == 1:
        return column.chunk(0)
    if column.num_chunks == 0:
        return pa.nulls(0, type=column.type)
    return pa.concat_arrays(column.chunks)


def _fixed_width_values(arr: pa.Array, dtype: np.dtype) -> np.ndarray:
    """A read-only numpy view of a null-free fixed-width Array's values (as ``to_numpy`` gives).

    Read from the buffers, not with ``to_numpy``: pyarrow's conversions check for pandas
    objects, which imports pandas (~40 MB of RSS) into a process that otherwise never needs it,
    e.g. a shard actor or a Serve replica."""
    if arr.null_count:
        raise ValueError(f"column of type {arr.type}: {arr.null_count} nulls where none may be")
    itemsize = np.dtype(dtype).itemsize
    buf = arr.buffers()[1]
    if buf is None:
        return np.zeros(0, dtype)
    return np.frombuffer(buf, dtype=dtype, count=len(arr), offset=arr.offset * itemsize)


def int64_column(table: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` (int64, no nulls) as a numpy array, pandas never imported."""
    return _fixed_width_values(one_chunk(table.column(name)), np.dtype(np.int64))


def take_rows(arr: pa.Array, positions: np.ndarray) -> pa.Array:
    """``arr`` at the row ``positions`` (n,) (an Arrow take; indices built from the numpy buffer,
    which keeps pandas out of the process, see ``_fixed_width_values``)."""
    pos = np.ascontiguousarray(positions, dtype=np.int64)
    return arr.take(pa.Array.from_buffers(pa.int64(), len(pos), [None, pa.py_buffer(pos)]))


_FLOAT_TYPES = {
    pa.float16(): np.dtype(np.float16),
    pa.float32(): np.dtype(np.float32),
    pa.float64(): np.dtype(np.float64),
}


def embeddings_of(table: pa.Table) -> np.ndarray | None:
    """(n, d) float32 view of the ``embedding`` column, or None when it was not stored."""
    if "embedding" not in table.column_names:
        return None
    col = one_chunk(table.column("embedding"))
    if col.null_count:
        raise ValueError(f"column embedding: {col.null_count} null vectors")
    dim = col.type.list_size
    values = col.values.slice(col.offset * dim, len(col) * dim)  # the list array's own slice of its child
    dtype = _FLOAT_TYPES.get(values.type)
    if dtype is None:
        raise ValueError(f"column embedding: values of type {values.type}, expected float16/32/64")
    flat = _fixed_width_values(values, dtype)
    return flat.reshape(len(col), dim).astype(np.float32, copy=False)
