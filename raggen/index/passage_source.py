"""Passages as a Ray Dataset: files (local or s3://) parsed by raggen.corpus.readers in read tasks, rows checked with the readers' own messages, a stable shard per id."""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raggen.corpus.readers import FORMAT_SUFFIXES, canonical_format, check_passage, format_from_name, missing_column
from raggen.errors import ConfigError, DataError
from raggen.storage import (
    is_s3_uri,
    open_store,
    pyarrow_s3_filesystem,
    split_s3_uri,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ reading


def detect_format(uri: str, s3_options=None) -> str:
    """'dpr-tsv' | 'jsonl' | 'parquet' from the file suffix (for a folder: from its first data file)."""
    uri = str(uri)
    fmt = format_from_name(uri)
    if fmt is not None:
        return fmt
    try:
        names = open_store(uri, s3_options).list()
    except Exception:  # noqa: BLE001 - a path that is neither a known file type nor a listable folder
        names = []
    for name in names:
        if (fmt := format_from_name(name)) is not None:
            return fmt
    raise ConfigError(f"format: cannot tell the format of {uri!r}; pass one of auto, dpr-tsv, jsonl, parquet")


def _paths_and_filesystem(uri: str, s3_options) -> tuple[str, Any]:
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        return f"{bucket}/{key}", pyarrow_s3_filesystem(s3_options)
    path = Path(os.path.expanduser(uri))
    if not path.exists():
        raise DataError(f"{uri}: no such file or folder")
    return str(path), None


def _is_single_file(uri: str, s3_options) -> bool:
    if is_s3_uri(uri):
        from raggen.storage import exists

        return bool(split_s3_uri(uri)[1]) and exists(uri, s3_options)
    return Path(os.path.expanduser(uri)).is_file()


_DATASOURCE = None


def _passage_datasource():
    """The Ray Data datasource class (built on first use: importing this module does not import Ray)."""
    global _DATASOURCE
    if _DATASOURCE is not None:
        return _DATASOURCE
    from ray.data.datasource import FileBasedDatasource

    from raggen.corpus.readers import iter_passage_records

    class PassageFiles(FileBasedDatasource):
        """Each read task parses its files with raggen.corpus.readers: the checks and messages of
        every other reader (file and line or row), streamed; ``.gz`` is decompressed by Ray."""

        def __init__(self, paths, *, fmt: str, display_prefix: str = "", batch_size: int = 4096, **kwargs):
            super().__init__(paths, **kwargs)
            self._fmt, self._prefix, self._batch = fmt, display_prefix, batch_size

        def _open_input_source(self, filesystem, path, **open_args):
            if self._fmt == "parquet":  # parquet needs random access (its footer is at the end)
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path):
            source = self._prefix + path
            for rec in iter_passage_records(f, source, self._fmt, self._batch):
                n = len(rec)
                yield pa.table({
                    "id": pa.array(rec.ids, pa.string()), "title": pa.array(rec.titles, pa.string()),
                    "text": pa.array(rec.texts, pa.string()), rec.unit: pa.array(rec.where, pa.int64()),
                    "path": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([source])),
                })  # fmt: skip

    _DATASOURCE = PassageFiles
    return _DATASOURCE


def read_passages_dataset(uri: str, *, format: str = "auto", s3_options=None, num_shards: int = 1):
    """A Ray Dataset with string columns id, title, text and int64 ``shard`` (crc32(id) % N).

    Read tasks parse files with :mod:`raggen.corpus.readers` (``format``: auto or one of its
    vocabulary, aliases included); a folder contributes the files with that format's suffixes."""
    import ray.data

    fmt = canonical_format(format)
    fmt = detect_format(uri, s3_options) if fmt == "auto" else fmt
    paths, fs = _paths_and_filesystem(uri, s3_options)
    exts = None if _is_single_file(uri, s3_options) else [sfx for sfx, f in FORMAT_SUFFIXES if f == fmt]
    source = _passage_datasource()(paths, fmt=fmt, display_prefix="s3://" if is_s3_uri(uri) else "",
                                   filesystem=fs, file_extensions=exts)  # fmt: skip
    ds = ray.data.read_datasource(source)
    return ds.map_batches(
        normalize_passages, fn_kwargs={"num_shards": num_shards}, batch_format="pyarrow", batch_size=None
    )


def stable_shard(ids: list[str], num_shards: int) -> np.ndarray:
    """crc32 of the UTF-8 passage id, mod N: the same shard for the same id everywhere, forever."""
    return np.fromiter((zlib.crc32(i.encode("utf-8")) % num_shards for i in ids), dtype=np.int64, count=len(ids))


def normalize_passages(table: pa.Table, num_shards: int = 1) -> pa.Table:
    """Check and normalise one block: id/title/text as strings, a missing title -> '', + shard.

    Rows are checked with :func:`raggen.corpus.readers.check_passage` (the readers' own check and
    messages): a null or blank id or text is a DataError naming the file (``path`` column) and the
    line (``line`` column), row (``row`` column) or, failing both, the row within the block."""
    import pyarrow.compute as pc

    source = table.column("path")[0].as_py() if "path" in table.column_names and table.num_rows else "passages"
    for col in ("id", "text"):
        if col not in table.column_names:
            raise missing_column(source, col, [c for c in table.column_names if c not in ("path", "line", "row")])
    ids = pc.utf8_trim_whitespace(table.column("id").cast(pa.string()))
    text = table.column("text").cast(pa.string())
    bad = pc.or_kleene(pc.or_kleene(ids.is_null(), pc.equal(ids, "")),
                       pc.or_kleene(text.is_null(), pc.equal(pc.utf8_trim_whitespace(text), "")))  # fmt: skip
    if pc.any(pc.fill_null(bad, True)).as_py():
        i = int(pc.index(pc.fill_null(bad, True), True).as_py())
        unit = next((u for u in ("line", "row") if u in table.column_names), None)
        where = f"{unit} {table.column(unit)[i].as_py()}" if unit else f"row {i + 1}"
        check_passage(source, where, ids[i].as_py(), text[i].as_py())
    title = (
        table.column("title").cast(pa.string()).fill_null("")
        if "title" in table.column_names
        else pa.array([""] * table.num_rows, pa.string())
    )
    return pa.table({"id": ids, "title": title, "text": text, "shard": stable_shard(ids.to_pylist(), num_shards)})
