"""A shard's passage texts as small compressed blocks in one file, so a process that serves a shard
holds only the block it is reading, never the decoded text column.

Why: ``pq.ParquetFile.read`` decodes the whole ``id``/``title``/``text`` columns into the process's
own memory (anonymous pages, ~1.6x the parquet's bytes measured on 100-word texts: ~600 B per
passage, ~3 GB for a quarter of DPR's 21M passages per shard actor). Here the texts stay compressed
on disk (zstd, blocks of ``rows_per_block`` rows, ~0.73x the parquet's bytes); a fetch decompresses
only its rows' blocks (tens of microseconds each), read with ``os.pread``: the file's pages are page
cache the kernel can drop, shared by every process of the node, and never mapped into the reader.
(Mapping it made each random read fault in the pages around it as well: after 200 single queries
of k=10 a process had 44 MB of a 78 MB blocks file resident, for ~10 MB of blocks read.)

The file is derived from a verified passage parquet into the local cache (never into a user's
folder) and is itself checked on every open: its footer records the parquet's sha256 it was made
from, its row count and the sha256 of everything before the footer.

Layout (little-endian): ``MAGIC`` | blocks | ``row_starts`` uint64[m+1] | ``block_starts``
uint64[m+1] | ``raw_sizes`` uint64[m] | meta JSON | trailer (index position uint64, meta length
uint64, ``MAGIC``). A block (before compression): rows ``r`` uint32, then the id, title and text
offsets (uint32[r+1] each, relative to that field's bytes), then the id, title and text bytes.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raggen.errors import IndexIntegrityError
from raggen.index.pread_file import PreadFile
from raggen.storage import AtomicFile, HashingWriter, iter_file_chunks, sha256_chunks

MAGIC = b"RGPBLK01"
FIELDS = ("id", "title", "text")
# measured on 680-character texts, 4 / 8 / 16 / 32 rows per block: 0.82 / 0.77 / 0.73 / 0.70x the
# parquet's bytes, 25 / 27 / 38 / 42 us to decompress a block (zstd's per-call setup dominates)
ROWS_PER_BLOCK = 16
CODEC = "zstd"
_TRAILER = struct.Struct("<QQ8s")
_U32 = struct.Struct("<I")


def _string_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 (n+1,) starting at 0, UTF-8 bytes as uint8) of a string column, nulls as ''."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    arr = arr.cast(pa.large_string())
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[offsets[0] : offsets[-1]]


def _block_payload(fields: list[tuple[np.ndarray, np.ndarray]], start: int, end: int) -> bytes:
    """Rows [start, end) of each field as one uncompressed block (see the module docstring)."""
    heads, bodies = [np.array([end - start], dtype=np.uint32)], []
    for offsets, data in fields:
        rel = offsets[start : end + 1] - offsets[start]
        heads.append(rel.astype(np.uint32))
        bodies.append(data[offsets[start] : offsets[end]])
    return b"".join(h.tobytes() for h in heads) + b"".join(b.tobytes() for b in bodies)


def write_passage_blocks(
    parquet_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    source_sha256: str,
    rows_per_block: int = ROWS_PER_BLOCK,
    batch_rows: int = 16384,
) -> int:
    """Write ``out_path`` (atomically) from the parquet's id/title/text columns, streamed: one
    record batch of ``batch_rows`` decoded at a time (no memory map of the parquet, so its pages do
    not count in this process). Returns the row count."""
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
    codec = pa.Codec(CODEC)
    row_starts, block_starts, raw_sizes = [0], [len(MAGIC)], []
    with pq.ParquetFile(parquet_path, memory_map=False) as pf, AtomicFile(out_path, "wb", compress=False) as f:
        out = HashingWriter(f)
        out.write(MAGIC)
        batches = pf.iter_batches(batch_size=max(rows_per_block, batch_rows), columns=list(FIELDS), use_threads=False)
        for batch in batches:
            fields = [_string_parts(batch.column(name)) for name in FIELDS]
            for start in range(0, batch.num_rows, rows_per_block):
                end = min(batch.num_rows, start + rows_per_block)
                raw = _block_payload(fields, start, end)
                out.write(codec.compress(raw, asbytes=True))
                row_starts.append(row_starts[-1] + end - start)
                block_starts.append(out.pos)
                raw_sizes.append(len(raw))
        index_pos = out.pos
        for arr in (row_starts, block_starts, raw_sizes):
            out.write(np.asarray(arr, dtype="<u8").tobytes())
        rows = row_starts[-1]
        meta = {
            "format": 1,
            "codec": CODEC,
            "fields": list(FIELDS),
            "rows": rows,
            "blocks": len(raw_sizes),
            "rows_per_block": rows_per_block,
            "source_sha256": source_sha256,
            "sha256": out.sha.hexdigest(),  # of everything before the meta
        }
        blob = json.dumps(meta, sort_keys=True).encode()
        f.write(blob + _TRAILER.pack(index_pos, len(blob), MAGIC))
    return rows


def _read_footer(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(MAGIC) + _TRAILER.size:
            raise ValueError("too short")
        f.seek(size - _TRAILER.size)
        index_pos, meta_len, magic = _TRAILER.unpack(f.read(_TRAILER.size))
        if magic != MAGIC or index_pos + meta_len + _TRAILER.size > size:
            raise ValueError("not a passage blocks file")
        f.seek(size - _TRAILER.size - meta_len)
        meta = json.loads(f.read(meta_len))
        f.seek(0)  # read(), not a map: hashing adds nothing to this process's RSS
        digest = sha256_chunks(iter_file_chunks(f, limit=size - _TRAILER.size - meta_len))
    if digest != meta.get("sha256"):
        raise ValueError("sha256 mismatch")
    return index_pos, meta


class PassageBlocks:
    """Read side: ``take(positions)`` -> (ids, titles, texts) of those rows (positions in the parquet's
    row order), decompressing each needed block once per call and holding one at a time (a call
    for 100k rows would otherwise hold most of the shard decompressed). Thread-safe."""

    def __init__(self, path: str | os.PathLike, *, source_sha256: str, rows: int):
        self.path = Path(path)
        try:
            index_pos, meta = _read_footer(self.path)
        except (OSError, ValueError, KeyError) as exc:
            raise IndexIntegrityError(f"{self.path}: unusable passage blocks ({exc})") from None
        if meta.get("source_sha256") != source_sha256 or meta.get("rows") != rows or meta.get("codec") != CODEC:
            raise IndexIntegrityError(
                f"{self.path}: made from another file (source {str(meta.get('source_sha256'))[:16]}..., "
                f"{meta.get('rows')} rows; expected {source_sha256[:16]}..., {rows} rows)"
            )
        m = int(meta["blocks"])
        self.rows, self._source_sha256 = rows, source_sha256
        self._file = PreadFile(self.path)
        index = np.frombuffer(self._file.read(8 * (3 * m + 2), index_pos), dtype="<u8")  # 24 B per block
        if len(index) != 3 * m + 2:
            self.close()
            raise IndexIntegrityError(f"{self.path}: block index truncated")
        self._row_starts, self._block_starts, self._raw_sizes = (
            index[: m + 1],
            index[m + 1 : 2 * m + 2],
            index[2 * m + 2 :],
        )
        self._local = threading.local()  # one pa.Codec per thread (not documented as thread-safe)

    def __len__(self) -> int:
        return self.rows

    def __reduce__(self):
        """A copy in another process opens (and checks) the file again: a descriptor is per process."""
        return (_reopen, (str(self.path), self._source_sha256, self.rows))

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def _block(self, b: int) -> tuple[bytes, list[list[int]]]:
        """Block ``b`` decompressed, and per field its rows' absolute (start, end) offsets in it."""
        start, end = int(self._block_starts[b]), int(self._block_starts[b + 1])
        codec = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = pa.Codec(CODEC)
        raw = codec.decompress(self._file.read(end - start, start), int(self._raw_sizes[b]), asbytes=True)
        (r,) = _U32.unpack_from(raw)
        flat = struct.unpack_from(f"<{3 * (r + 1)}I", raw, 4)  # a few us; numpy's set-up cost ~25 per block
        offsets, base = [], 4 + 12 * (r + 1)
        for f in range(3):  # each field's bytes follow the previous field's
            field = [base + o for o in flat[f * (r + 1) : (f + 1) * (r + 1)]]
            offsets.append(field)
            base = field[-1]
        return raw, offsets

    def take(self, positions: np.ndarray) -> tuple[list[str], list[str], list[str]]:
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.rows):
            raise IndexError(f"passage positions outside 0..{self.rows - 1}")
        blocks = np.searchsorted(self._row_starts, positions, side="right") - 1
        rows = (positions - self._row_starts[blocks].astype(np.int64)).tolist()  # row within its block
        block_of = blocks.tolist()
        out: tuple[list, list, list] = ([None] * len(rows), [None] * len(rows), [None] * len(rows))
        ids, titles, texts = out
        current, raw, (o_id, o_title, o_text) = -1, b"", ([], [], [])
        for j in np.argsort(blocks, kind="stable").tolist():  # block by block: one decompressed at a time
            if block_of[j] != current:
                current = block_of[j]
                raw, (o_id, o_title, o_text) = self._block(current)
            i = rows[j]
            ids[j] = raw[o_id[i] : o_id[i + 1]].decode("utf-8")
            titles[j] = raw[o_title[i] : o_title[i + 1]].decode("utf-8")
            texts[j] = raw[o_text[i] : o_text[i + 1]].decode("utf-8")
        return out


def _reopen(path: str, source_sha256: str, rows: int) -> PassageBlocks:
    return PassageBlocks(path, source_sha256=source_sha256, rows=rows)
