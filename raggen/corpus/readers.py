"""Passage readers and writers: DPR ``psgs_w100.tsv``, JSONL and parquet, streamed and validated.

Every reader yields DataFrames with the columns ``id``, ``text``, ``title`` (all ``str``). Bad
input raises :class:`raggen.errors.DataError` with one line naming the file and the 1-based line
(TSV, JSONL), row (parquet) or column, so that a 21M-passage build fails early and says where.

One stack for every reader: :func:`iter_passage_records` parses a stream and :func:`check_passage`
checks each passage, here and in the Ray Data pipeline (``raggen.index.encode``), so a bad row gets
the same message either way. One format vocabulary (the config's): ``dpr-tsv``, ``jsonl``,
``parquet`` (+ ``auto``), with the aliases ``tsv``/``dpr`` and ``json`` mapped in
:func:`canonical_format`. Writes go through ``raggen.storage``'s atomic writer.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from raggen.corpus.text_files import check_exists, iter_lines, jsonl_objects, local_path, open_binary, tsv_rows
from raggen.errors import ConfigError, DataError
from raggen.storage import atomic_writer  # noqa: F401  (re-exported: the one atomic-write helper)

COLUMNS = ("id", "text", "title")

# --------------------------------------------------------------------------- the format vocabulary
#: the one vocabulary of passage formats (the config's names); every reader and the Ray Data
#: pipeline (raggen.index.encode) map names through :func:`canonical_format`
FORMATS = ("dpr-tsv", "jsonl", "parquet")
FORMAT_ALIASES = {"tsv": "dpr-tsv", "dpr": "dpr-tsv", "json": "jsonl"}
FORMAT_SUFFIXES = (
    (".tsv.gz", "dpr-tsv"), (".tsv", "dpr-tsv"), (".jsonl.gz", "jsonl"), (".jsonl", "jsonl"),
    (".json.gz", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"),
)  # fmt: skip


def canonical_format(format: str) -> str:
    """``auto`` or one of :data:`FORMATS`, aliases mapped (tsv, dpr -> dpr-tsv; json -> jsonl)."""
    name = FORMAT_ALIASES.get(str(format).lower(), str(format).lower())
    if name != "auto" and name not in FORMATS:
        aliases = ", ".join(f"{a} -> {c}" for a, c in FORMAT_ALIASES.items())
        raise ConfigError(f"format: must be auto, {', '.join(FORMATS)} (aliases: {aliases}); got {format!r}")
    return name


def format_from_name(name: str) -> str | None:
    """The format a file name implies (``.tsv[.gz]``, ``.jsonl[.gz]``, ``.json[.gz]``, ``.parquet``), or None."""
    lower = str(name).lower()
    return next((fmt for suffix, fmt in FORMAT_SUFFIXES if lower.endswith(suffix)), None)


def detect_format(path: str | Path, format: str = "auto") -> str:
    """``dpr-tsv``, ``jsonl`` or ``parquet``: the given format, or the one the file name implies."""
    fmt = canonical_format(format)
    if fmt != "auto":
        return fmt
    fmt = format_from_name(Path(path).name)
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the file name "
            "(expected .tsv, .tsv.gz, .jsonl, .jsonl.gz, .json or .parquet)"
        )
    return fmt


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


def check_passage(
    source: str | Path, where: str, pid: str | None, text: str | None, seen: _SeenIds | None = None
) -> None:
    """The one passage check (readers here and the Ray Data pipeline): an id and a text that are
    present and not blank, and (with ``seen``) an id not seen before. ``where`` is "line N" or
    "row N". Raises a DataError naming the file and the place."""
    if pid is None:
        raise DataError(f"{source}: {where}: column 'id' is null")
    if text is None:
        raise DataError(f"{source}: {where}: column 'text' is null")
    if not pid.strip():
        raise DataError(f"{source}: {where}: empty passage id")
    if not text.strip():
        raise DataError(f"{source}: {where}: empty passage text (id {pid!r})")
    if seen is not None and seen.add(pid):
        raise DataError(f"{source}: {where}: duplicate passage id {pid!r}")


def missing_column(source: str | Path, column: str, columns: list[str], where: str | None = None) -> DataError:
    """The one "missing column" error: names the file, the place (if any), the column and what is there."""
    place = f"{where}: " if where else ""
    return DataError(f"{source}: {place}missing column {column!r} (columns: {list(columns)})")


@dataclass
class PassageRecords:
    """One batch of checked passages; ``where[i]`` is the 1-based line (TSV, JSONL) or row (parquet)."""

    unit: str  # "line" | "row"
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    where: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, pid: str, text: str, title: str, where: int) -> None:
        self.ids.append(pid)
        self.texts.append(text)
        self.titles.append(title)
        self.where.append(where)

    def frame(self) -> pd.DataFrame:
        return _frame(self.ids, self.texts, self.titles)


def _frame(ids: list[str], texts: list[str], titles: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "text": texts, "title": titles}, columns=list(COLUMNS))


# --------------------------------------------------------------------------- per-format readers


def _tsv_records(f: Any, source: str | Path, batch_size: int) -> Iterator[PassageRecords]:
    rows = tsv_rows(iter_lines(f, source), source, strict=True)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{source}: line 1: empty file, expected a header line 'id<TAB>text<TAB>title'")
    header = [h.strip() for h in first[1]]
    for col in ("id", "text"):
        if col not in header:
            raise missing_column(source, col, header, f"line {first[0]}")
    i_id, i_text = header.index("id"), header.index("text")
    i_title = header.index("title") if "title" in header else None
    seen = _SeenIds()
    batch = PassageRecords("line")
    for lineno, row in rows:
        if len(row) != len(header):
            raise DataError(
                f"{source}: line {lineno}: expected {len(header)} tab-separated fields "
                f"({', '.join(header)}), found {len(row)}"
            )
        pid, text = row[i_id].strip(), row[i_text]
        check_passage(source, f"line {lineno}", pid, text, seen)
        batch.add(pid, text, row[i_title] if i_title is not None else "", lineno)
        if len(batch) >= batch_size:
            yield batch
            batch = PassageRecords("line")
    if len(batch):
        yield batch


def _jsonl_field(source: str | Path, lineno: int, obj: dict, key: str, required: bool) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise missing_column(source, key, list(obj), f"line {lineno}")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{source}: line {lineno}: column {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def _jsonl_records(f: Any, source: str | Path, batch_size: int) -> Iterator[PassageRecords]:
    seen = _SeenIds()
    batch = PassageRecords("line")
    for lineno, obj in jsonl_objects(iter_lines(f, source), source):
        pid = _jsonl_field(source, lineno, obj, "id", required=True).strip()
        text = _jsonl_field(source, lineno, obj, "text", required=True)
        check_passage(source, f"line {lineno}", pid, text, seen)
        batch.add(pid, text, _jsonl_field(source, lineno, obj, "title", required=False), lineno)
        if len(batch) >= batch_size:
            yield batch
            batch = PassageRecords("line")
    if len(batch):
        yield batch


def _parquet_records(f: Any, source: str | Path, batch_size: int) -> Iterator[PassageRecords]:
    """``f``: a path or a random-access file (parquet keeps its footer at the end)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{source}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    for col in ("id", "text"):
        if col not in names:
            raise missing_column(source, col, names)
    columns = [c for c in COLUMNS if c in names]
    seen = _SeenIds()
    row0 = 0
    for record_batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        cols = {c: record_batch.column(c).to_pylist() for c in columns}
        batch = PassageRecords("row")
        titles = cols.get("title") or [None] * record_batch.num_rows
        for i, (pid, text, title) in enumerate(zip(cols["id"], cols["text"], titles)):
            pid = None if pid is None else str(pid).strip()
            text = None if text is None else str(text)
            check_passage(source, f"row {row0 + i + 1}", pid, text, seen)
            batch.add(pid, text, "" if title is None else str(title), row0 + i + 1)
        row0 += record_batch.num_rows
        yield batch


def iter_passage_records(f: Any, source: str | Path, format: str, batch_size: int = 10000) -> Iterator[PassageRecords]:
    """Checked passages of one file, streamed: the parser behind every reader (here and in the Ray
    Data pipeline). ``f``: an uncompressed binary stream for dpr-tsv / jsonl, a path or a
    random-access file for parquet; ``source`` names the file in errors; ``format`` is not auto."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fmt = canonical_format(format)
    if fmt == "dpr-tsv":
        yield from _tsv_records(f, source, batch_size)
    elif fmt == "jsonl":
        yield from _jsonl_records(f, source, batch_size)
    elif fmt == "parquet":
        yield from _parquet_records(f, source, batch_size)
    else:
        raise ConfigError("format: iter_passage_records needs a concrete format, not auto")


# --------------------------------------------------------------------------- public API


def iter_passage_batches(path: str | Path, format: str = "auto", batch_size: int = 10000) -> Iterator[pd.DataFrame]:
    """Stream a passage file as DataFrames of at most ``batch_size`` rows (id, text, title).

    Memory stays bounded by the batch (plus a bitmap of seen ids), so DPR's 21M-line TSV streams.
    Validation errors are raised when the bad row is reached.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = local_path(path)
    fmt = detect_format(path, format)
    check_exists(path)
    if fmt == "parquet":
        for batch in iter_passage_records(path, path, fmt, batch_size):
            yield batch.frame()
        return
    with open_binary(path) as f:
        for batch in iter_passage_records(f, path, fmt, batch_size):
            yield batch.frame()


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
    titles = passages["title"].fillna("").astype(str).tolist() if "title" in passages.columns else [""] * len(ids)
    fmt = detect_format(path, format)
    if fmt == "dpr-tsv":
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
