"""Text files read line by line (plain or gzip), so a bad byte, a malformed TSV row or a line
that is not a JSON object is a :class:`raggen.errors.DataError` naming the file and the 1-based line.

The passage readers (:mod:`raggen.corpus.readers`) and the QA readers (:mod:`raggen.corpus.qa`)
parse through these.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from raggen.errors import DataError

_FIELD_SIZE_LIMIT = 1 << 28  # passages of custom corpora can exceed csv's 128 KiB default


def local_path(path: str | Path) -> Path:
    """``path`` as a Path; a URI (``s3://...``) is refused: the storage layer downloads it first."""
    if isinstance(path, str) and "://" in path:
        raise DataError(f"{path}: corpus readers take local files; fetch remote URIs with raggen.storage first")
    return Path(path)


def check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: no such file")


def open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


class _RawReader(io.RawIOBase):
    """Any object with ``read(n)`` (a pyarrow stream, a gzip file) as a raw stream for BufferedReader."""

    def __init__(self, f: Any):
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def iter_lines(f: Any, source: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) of an (uncompressed) binary stream; bad UTF-8 and read
    errors are DataErrors naming ``source`` and the line."""
    stream = io.BufferedReader(_RawReader(f), buffer_size=1 << 20)
    lineno = 0
    while True:
        try:
            raw = stream.readline()
        except (OSError, EOFError) as e:  # a truncated or corrupt .gz
            raise DataError(f"{source}: line {lineno + 1}: cannot read ({e})") from None
        if not raw:
            return
        lineno += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{source}: line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            ) from None
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        yield lineno, line


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) of a text file, plain or gzip; bad UTF-8 is a DataError.

    Decoding line by line (rather than letting ``open`` decode) is what lets the error name the
    line that holds the bad bytes.
    """
    path = local_path(path)
    check_exists(path)
    with open_binary(path) as f:
        yield from iter_lines(f, path)


class _LineTracker:
    """Feeds decoded lines to ``csv.reader`` and remembers the number of the last line fed."""

    def __init__(self, lines: Iterator[tuple[int, str]]):
        self.lines = lines
        self.lineno = 0

    def __iter__(self) -> Iterator[str]:
        for self.lineno, line in self.lines:  # noqa: B020 - the tracker records where each line came from
            yield line


def tsv_rows(lines: Iterator[tuple[int, str]], source: str | Path, strict: bool) -> Iterator[tuple[int, list[str]]]:
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_SIZE_LIMIT))
    tracker = _LineTracker(lines)
    reader = csv.reader(tracker, delimiter="\t", quotechar='"', doublequote=True, strict=strict)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{source}: line {start}: malformed TSV row ({e})") from None
        if row and any(field.strip() for field in row):
            yield start, row
        start = tracker.lineno + 1


def iter_tsv_rows(path: str | Path, strict: bool = True) -> Iterator[tuple[int, list[str]]]:
    """(first line of the row, fields) for a tab-separated file quoted as DPR's (``csv`` rules).

    A quoted field may span lines, so the row's number is the line where it starts. Blank lines
    are skipped. ``strict`` rejects stray quotes and an unterminated quoted field (which would
    otherwise swallow the rest of the file); ``strict=False`` reads exactly as DPR's code does.
    """
    yield from tsv_rows(iter_text_lines(path), path, strict)


def jsonl_objects(lines: Iterator[tuple[int, str]], source: str | Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a DataError."""
    yield from jsonl_objects(iter_text_lines(path), path)
