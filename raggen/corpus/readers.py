"""Passage readers and writers: DPR ``psgs_w100.tsv``, JSONL and parquet, streamed and validated.

Every reader yields DataFrames with the columns ``id``, ``text``, ``title`` (all ``str``). Bad
input raises :class:`raggen.errors.DataError` with one line naming the file and the 1-based line
(TSV, JSONL), row (parquet) or column, so that a 21M-passage build fails early and says where.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pandas as pd

from raggen.errors import DataError

COLUMNS = ("id", "text", "title")
FORMATS = ("tsv", "jsonl", "parquet")
_FIELD_SIZE_LIMIT = 1 << 28  # passages of custom corpora can exceed csv's 128 KiB default


# --------------------------------------------------------------------------- file helpers


def detect_format(path: str | Path, format: str = "auto") -> str:
    """``tsv``, ``jsonl`` or ``parquet``: the given format, or the one the file name implies."""
    if format != "auto":
        if format not in FORMATS:
            raise ValueError(f"format must be one of auto, {', '.join(FORMATS)}; got {format!r}")
        return format
    name = Path(path).name.lower()
    for suffix, fmt in ((".tsv", "tsv"), (".tsv.gz", "tsv"), (".jsonl", "jsonl"),
                        (".jsonl.gz", "jsonl"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{path}: cannot tell the format from the file name "
                    "(expected .tsv, .tsv.gz, .jsonl, .jsonl.gz or .parquet)")


def local_path(path: str | Path) -> Path:
    """``path`` as a Path; a URI (``s3://...``) is refused: the storage layer downloads it first."""
    if isinstance(path, str) and "://" in path:
        raise DataError(f"{path}: corpus readers take local files; fetch remote URIs with raggen.storage first")
    return Path(path)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: no such file")


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) of a text file, plain or gzip; bad UTF-8 is a DataError.

    Decoding line by line (rather than letting ``open`` decode) is what lets the error name the
    line that holds the bad bytes.
    """
    path = local_path(path)
    _check_exists(path)
    with _open_binary(path) as f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:  # a truncated or corrupt .gz
                raise DataError(f"{path}: line {lineno + 1}: cannot read ({e})") from None
            if not raw:
                return
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid UTF-8 "
                                f"(byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield lineno, line


class _LineTracker:
    """Feeds decoded lines to ``csv.reader`` and remembers the number of the last line fed."""

    def __init__(self, path: str | Path):
        self.lines = iter_text_lines(path)
        self.lineno = 0

    def __iter__(self) -> Iterator[str]:
        for self.lineno, line in self.lines:
            yield line


def iter_tsv_rows(path: str | Path, strict: bool = True) -> Iterator[tuple[int, list[str]]]:
    """(first line of the row, fields) for a tab-separated file quoted as DPR's (``csv`` rules).

    A quoted field may span lines, so the row's number is the line where it starts. Blank lines
    are skipped. ``strict`` rejects stray quotes and an unterminated quoted field (which would
    otherwise swallow the rest of the file); ``strict=False`` reads exactly as DPR's code does.
    """
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_SIZE_LIMIT))
    lines = _LineTracker(path)
    reader = csv.reader(lines, delimiter="\t", quotechar='"', doublequote=True, strict=strict)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}: line {start}: malformed TSV row ({e})") from None
        if row and any(field.strip() for field in row):
            yield start, row
        start = lines.lineno + 1


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one step.

    Readers never see a half-written file, and a failed write leaves the old file in place.
    ``.gz`` paths are gzip-compressed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    binary = "b" in mode
    try:
        if path.name.endswith(".gz"):
            f = gzip.open(tmp, "wb" if binary else "wt", encoding=None if binary else "utf-8",
                          newline=None if binary else "")
        else:
            f = open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8",
                     newline=None if binary else "")
        with f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- validation


class _SeenIds:
    """Remembers passage ids to catch duplicates in one pass over a huge file.

    DPR's ids are the integers 1..21M: those go in a bitmap (2.6 MB for 21M ids) instead of a
    set of strings (~1.5 GB); any other id goes in a set.
    """

    _MAX_BITMAP_ID = 1 << 33

    def __init__(self) -> None:
        self.bits = bytearray()
        self.others: set[str] = set()

    def add(self, pid: str) -> bool:
        """Record ``pid``; True when it was seen before."""
        if pid.isdigit() and pid.isascii() and (pid == "0" or pid[0] != "0") and len(pid) < 11:
            n = int(pid)
            if n < self._MAX_BITMAP_ID:
                byte, bit = divmod(n, 8)
                if byte >= len(self.bits):
                    self.bits.extend(bytes(max(byte + 1 - len(self.bits), len(self.bits))))
                seen = bool(self.bits[byte] & (1 << bit))
                self.bits[byte] |= 1 << bit
                return seen
        if pid in self.others:
            return True
        self.others.add(pid)
        return False


def _check_passage(path: Path, where: str, pid: str, text: str, seen: _SeenIds) -> None:
    if not pid.strip():
        raise DataError(f"{path}: {where}: empty passage id")
    if not text.strip():
        raise DataError(f"{path}: {where}: empty passage text (id {pid!r})")
    if seen.add(pid):
        raise DataError(f"{path}: {where}: duplicate passage id {pid!r}")


def _frame(ids: list[str], texts: list[str], titles: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "text": texts, "title": titles}, columns=list(COLUMNS))


# --------------------------------------------------------------------------- per-format readers


def _tsv_batches(path: Path, batch_size: int) -> Iterator[pd.DataFrame]:
    rows = iter_tsv_rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: line 1: empty file, expected a header line 'id<TAB>text<TAB>title'")
    header = [h.strip() for h in first[1]]
    for col in ("id", "text"):
        if col not in header:
            raise DataError(f"{path}: line {first[0]}: missing column {col!r} in header {header}")
    i_id, i_text = header.index("id"), header.index("text")
    i_title = header.index("title") if "title" in header else None
    seen = _SeenIds()
    ids: list[str] = []
    texts: list[str] = []
    titles: list[str] = []
    for lineno, row in rows:
        if len(row) != len(header):
            raise DataError(f"{path}: line {lineno}: expected {len(header)} tab-separated fields "
                            f"({', '.join(header)}), found {len(row)}")
        pid, text = row[i_id].strip(), row[i_text]
        _check_passage(path, f"line {lineno}", pid, text, seen)
        ids.append(pid)
        texts.append(text)
        titles.append(row[i_title] if i_title is not None else "")
        if len(ids) >= batch_size:
            yield _frame(ids, texts, titles)
            ids, texts, titles = [], [], []
    if ids:
        yield _frame(ids, texts, titles)


def _jsonl_field(path: Path, lineno: int, obj: dict, key: str, required: bool) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{path}: line {lineno}: missing column {key!r}")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{path}: line {lineno}: column {key!r} must be a string, "
                        f"got {type(value).__name__}")
    return str(value)


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a DataError."""
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _jsonl_batches(path: Path, batch_size: int) -> Iterator[pd.DataFrame]:
    seen = _SeenIds()
    ids: list[str] = []
    texts: list[str] = []
    titles: list[str] = []
    for lineno, obj in iter_jsonl_objects(path):
        pid = _jsonl_field(path, lineno, obj, "id", required=True).strip()
        text = _jsonl_field(path, lineno, obj, "text", required=True)
        _check_passage(path, f"line {lineno}", pid, text, seen)
        ids.append(pid)
        texts.append(text)
        titles.append(_jsonl_field(path, lineno, obj, "title", required=False))
        if len(ids) >= batch_size:
            yield _frame(ids, texts, titles)
            ids, texts, titles = [], [], []
    if ids:
        yield _frame(ids, texts, titles)


def _parquet_batches(path: Path, batch_size: int) -> Iterator[pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_exists(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    for col in ("id", "text"):
        if col not in names:
            raise DataError(f"{path}: missing column {col!r} (columns: {names})")
    columns = [c for c in COLUMNS if c in names]
    seen = _SeenIds()
    row0 = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        df = batch.to_pandas()
        for col in ("id", "text"):
            nulls = df[col].isna().to_numpy().nonzero()[0]
            if len(nulls):
                raise DataError(f"{path}: row {row0 + nulls[0] + 1}: column {col!r} is null")
        ids = [str(x).strip() for x in df["id"].tolist()]
        texts = [str(x) for x in df["text"].tolist()]
        titles = ([("" if x is None else str(x)) for x in df["title"].tolist()]
                  if "title" in df else [""] * len(df))
        for i, (pid, text) in enumerate(zip(ids, texts)):
            _check_passage(path, f"row {row0 + i + 1}", pid, text, seen)
        row0 += len(df)
        yield _frame(ids, texts, titles)


# --------------------------------------------------------------------------- public API


def iter_passage_batches(path: str | Path, format: str = "auto",
                         batch_size: int = 10000) -> Iterator[pd.DataFrame]:
    """Stream a passage file as DataFrames of at most ``batch_size`` rows (id, text, title).

    Memory stays bounded by the batch (plus a bitmap of seen ids), so DPR's 21M-line TSV streams.
    Validation errors are raised when the bad row is reached.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = local_path(path)
    fmt = detect_format(path, format)
    if fmt == "tsv":
        yield from _tsv_batches(path, batch_size)
    elif fmt == "jsonl":
        yield from _jsonl_batches(path, batch_size)
    else:
        yield from _parquet_batches(path, batch_size)


def read_passages(path: str | Path, format: str = "auto") -> pd.DataFrame:
    """The whole passage file as one DataFrame with str columns id, text, title."""
    batches = list(iter_passage_batches(path, format=format, batch_size=100_000))
    if not batches:
        return _frame([], [], [])
    return pd.concat(batches, ignore_index=True) if len(batches) > 1 else batches[0]


def write_passages(path: str | Path, passages: pd.DataFrame, format: str = "auto") -> Path:
    """Write passages (id, text, title) atomically as DPR TSV, JSONL or parquet."""
    path = Path(path)
    missing = [c for c in ("id", "text") if c not in passages.columns]
    if missing:
        raise ValueError(f"passages lack column(s) {missing}")
    ids = passages["id"].astype(str).tolist()
    texts = passages["text"].astype(str).tolist()
    titles = (passages["title"].fillna("").astype(str).tolist() if "title" in passages.columns
              else [""] * len(ids))
    fmt = detect_format(path, format)
    if fmt == "tsv":
        with atomic_writer(path) as f:
            writer = csv.writer(f, delimiter="\t", quotechar='"', lineterminator="\n")
            writer.writerow(COLUMNS)
            writer.writerows(zip(ids, texts, titles))
    elif fmt == "jsonl":
        with atomic_writer(path) as f:
            for pid, text, title in zip(ids, texts, titles):
                f.write(json.dumps({"id": pid, "text": text, "title": title}, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": ids, "text": texts, "title": titles})
        with atomic_writer(path, "wb") as f:
            pq.write_table(table, f)
    return path
