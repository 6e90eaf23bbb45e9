"""A shard's stored embeddings as a ``.npy`` in the local cache, read row by row with ``os.pread``, so
that a shard actor serving training (which needs the exact stored vectors d(z)) holds only the rows
of the call it is answering.

Why: the parquet's ``embedding`` column decoded is 3 KiB per 768-d passage of anonymous memory
(64.5 GB over DPR's 21M passages, split over the shard actors); in the file, its pages are page
cache that the kernel can drop and every process of the node shares. The file is not mapped: a
mapped file's random reads fault in the pages around each row as well, so the reader's RSS would
grow towards the whole file (measured on the passage blocks, see ``passage_blocks``). The file is derived from a
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
from raggen.index.pread_file import PreadFile
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


class PassageVectors:
    """The (rows, d) float32 rows of a verified ``.npy``: ``vectors[positions]`` -> (n, d), each row
    read with ``os.pread`` (thread-safe; nothing of the file is mapped). ``np.asarray`` reads all."""

    def __init__(self, path: Path, *, rows: int, dim: int, offset: int):
        self.path, self.shape, self.dtype = Path(path), (rows, dim), np.dtype(np.float32)
        self._offset, self._row_bytes = offset, 4 * dim
        self._file = PreadFile(self.path)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, positions) -> np.ndarray:
        pos = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        if len(pos) and (pos.min() < 0 or pos.max() >= self.shape[0]):
            raise IndexError(f"stored vector rows outside 0..{self.shape[0] - 1}")
        out = np.empty((len(pos), self.shape[1]), dtype="<f4")
        step = self._row_bytes
        for i, p in enumerate(pos.tolist()):
            row = self._file.read(step, self._offset + p * step)
            if len(row) != step:
                raise IndexIntegrityError(f"{self.path}: row {p} truncated")
            out[i] = np.frombuffer(row, dtype="<f4")
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[np.arange(self.shape[0])]
        return whole if dtype is None else whole.astype(dtype)

    def __reduce__(self):
        """A copy in another process opens the file again: a descriptor is per process."""
        return (_reopen, (str(self.path), *self.shape, self._offset))

    def close(self) -> None:
        self._file.close()


def open_passage_vectors(path: Path, *, source_sha256: str, rows: int) -> PassageVectors:
    """The verified file's (rows, d) float32 rows, read on demand (see ``PassageVectors``)."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        if meta["source_sha256"] != source_sha256 or int(meta["shape"][0]) != rows:
            raise ValueError(f"made from another file ({str(meta['source_sha256'])[:16]}..., {meta['shape'][0]} rows)")
        if sha256_file(path) != meta["sha256"]:  # streamed reads: nothing of it stays in this process
            raise ValueError("sha256 mismatch")
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexIntegrityError(f"{path}: unusable stored vectors ({exc})") from None
    if dtype != np.dtype("<f4") or fortran or tuple(shape) != tuple(meta["shape"]) or len(shape) != 2:
        raise IndexIntegrityError(f"{path}: holds {dtype} {shape}, expected float32 {meta['shape']}")
    if os.path.getsize(path) != offset + 4 * shape[0] * shape[1]:
        raise IndexIntegrityError(f"{path}: {os.path.getsize(path)} bytes, expected {offset + 4 * shape[0] * shape[1]}")
    return PassageVectors(path, rows=int(shape[0]), dim=int(shape[1]), offset=offset)


def _reopen(path: str, rows: int, dim: int, offset: int) -> PassageVectors:
    return PassageVectors(Path(path), rows=rows, dim=dim, offset=offset)
