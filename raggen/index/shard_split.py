"""Stage 1 of the encode pipeline: the corpus split into one parquet folder per shard with Ray Data,
in a folder raggen owns (its marker), counts cached for resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raggen.errors import DataError, RaggenError, find_user_error
from raggen.index.passage_source import read_passages_dataset
from raggen.index.work_dir import _read_json, _write_json
from raggen.storage import (
    claim_folder,
    is_s3_uri,
    join_uri,
    owns_folder,
    pyarrow_s3_filesystem,
    release_folder,
    split_s3_uri,
)

SPLIT_MARKER = ".raggen-split"  # in every split folder raggen made


def split_folder_uri(work_dir: Path, split_uri: str | None, work_id: str) -> str:
    """Where stage 1 writes: ``work_dir/split``, or a folder of this work dir's own under
    ``split_uri`` (``<split_uri>/raggen-split-<work id>``): runs that share a ``split_uri`` never
    share (or delete) each other's split, and nothing else in ``split_uri`` is touched."""
    if split_uri is None:
        return str(work_dir / "split")
    return join_uri(str(split_uri), f"raggen-split-{work_id}")


def split_location(uri: str, s3_options) -> tuple[str, Any]:
    """(path for Ray Data, pyarrow filesystem or None) of a split folder URI.

    Ray Data's write tasks run on every node: on a multi-node cluster the split must live on
    storage they all reach (``split_uri="s3://bucket/tmp/split"`` or a shared file system).
    """
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        return f"{bucket}/{key}", pyarrow_s3_filesystem(s3_options)
    return str(Path(uri)), None


def _fs(fs):
    from pyarrow import fs as pafs

    return fs or pafs.LocalFileSystem()


def split_by_shard(
    passages_uri: str,
    work_dir: Path,
    *,
    format: str,
    num_shards: int,
    s3_options,
    split_uri: str | None = None,
    work_id: str = "0",
) -> list[int]:
    """Write <split>/shard=K/*.parquet with Ray Data; returns the count per shard.

    The counts are cached in work_dir/split.json; an unfinished split is redone from scratch in a
    split folder raggen owns (``.raggen-split`` marker); a folder without the marker is refused."""
    from pyarrow import fs as pafs

    uri = split_folder_uri(work_dir, split_uri, work_id)
    path, fs = split_location(uri, s3_options)
    done = _read_json(work_dir / "split.json")
    if done is not None and len(done.get("counts", [])) == num_shards and done.get("split") == path:
        return [int(c) for c in done["counts"]]
    if owns_folder(uri, SPLIT_MARKER, s3_options):
        release_folder(uri, SPLIT_MARKER, s3_options=s3_options)  # an unfinished split of ours
    claim_folder(uri, SPLIT_MARKER, what="split_uri", s3_options=s3_options)
    ds = read_passages_dataset(passages_uri, format=format, s3_options=s3_options, num_shards=num_shards)
    with _user_errors():
        ds.write_parquet(path, filesystem=fs, partition_cols=["shard"])
    filesystem = _fs(fs)
    counts = [0] * num_shards
    for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.is_file and info.path.endswith(".parquet"):
            shard = int(info.path.rsplit("shard=", 1)[1].split("/", 1)[0])
            with filesystem.open_input_file(info.path) as f:
                counts[shard] += pq.ParquetFile(f).metadata.num_rows
    if sum(counts) == 0:
        raise DataError(f"{passages_uri}: no passages found")
    _write_json(work_dir / "split.json", {"counts": counts, "source": passages_uri, "split": path, "uri": uri})
    return counts


class _user_errors:
    """Re-raise a RaggenError raised inside a Ray task/actor as itself (one line, no Ray wrapper)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or (isinstance(exc, RaggenError) and type(exc).__module__ == "raggen.errors"):
            return False
        cause = find_user_error(exc)
        if cause is not None:
            raise cause from None
        return False
