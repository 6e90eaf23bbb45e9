"""A shard's stored embeddings as a memory-mapped ``.npy`` in the local cache, so that a shard actor
serving training (which needs the exact stored vectors d(z)) holds only the rows it has read.

Why: the parquet's ``embedding`` column decoded is 3 KiB per 768-d passage of anonymous memory
(64.5 GB over DPR's 21M passages, split over the shard actors); mapped, its pages are page cache
that the kernel can drop and every process of the node shares. The file is derived from a
verified parquet (streamed, one record batch at a time) and checked on every open against a
sidecar JSON: the parquet's sha256 it was made from, its shape, and its own sha256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raggen.errors import IndexIntegrityError
from raggen.index.passage_table import embeddings_of
from raggen.storage import AtomicFile, HashingWriter, atomic_write_bytes, sha256_file


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_passage_vectors(
    parquet_path: str | os.PathLike, out_path: str | os.PathLike, *, source_sha256: str, batch_rows: int = 8192
) -> tuple[int, int]:
    """Write the parquet's ``embedding`` column as a float32 (n, d) ``.npy`` (atomically, then its
    sidecar). Returns (n, d)."""
    out_path = Path(out_path)
    with pq.ParquetFile(parquet_path, memory_map=False) as pf:
        n = pf.metadata.num_rows
        dim = getattr(pf.schema_arrow.field("embedding").type, "list_size", None)
        if not dim or dim < 1:
            raise IndexIntegrityError(f"{parquet_path}: column embedding is not a fixed-size list")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": (n, dim)}
        with AtomicFile(out_path, "wb", compress=False) as f:
            out = HashingWriter(f)
            out.write(_npy_header(header))
            written = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=["embedding"], use_threads=False):
                rows = embeddings_of(batch)
                out.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
                written += len(rows)
            if written != n:
                raise IndexIntegrityError(f"{parquet_path}: read {written} embeddings of {n} rows")
    meta = {"source_sha256": source_sha256, "shape": [n, dim], "sha256": out.sha.hexdigest()}
    atomic_write_bytes(_sidecar(out_path), json.dumps(meta, sort_keys=True).encode())
    return n, dim


def _npy_header(header: dict) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def map_passage_vectors(path: Path, *, source_sha256: str, rows: int) -> np.ndarray:
    """The verified file as a read-only (rows, d) float32 memory map."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        if meta["source_sha256"] != source_sha256 or int(meta["shape"][0]) != rows:
            raise ValueError(f"made from another file ({str(meta['source_sha256'])[:16]}..., {meta['shape'][0]} rows)")
        if sha256_file(path) != meta["sha256"]:  # streamed reads: nothing of it stays in this process
            raise ValueError("sha256 mismatch")
        vectors = np.load(path, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexIntegrityError(f"{path}: unusable stored vectors ({exc})") from None
    if vectors.dtype != np.float32 or vectors.shape != tuple(meta["shape"]):
        raise IndexIntegrityError(f"{path}: holds {vectors.dtype} {vectors.shape}, expected float32 {meta['shape']}")
    return vectors
