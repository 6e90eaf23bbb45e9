"""URI-level helpers over the stores: read, write, list, download and upload by URI."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from raggen.storage.names import check_relative_name, is_s3_uri, split_s3_uri
from raggen.storage.stores import _MISSING_CODES, S3Store, _error_code, open_store

logger = logging.getLogger(__name__)


def _parent_and_name(uri: str) -> tuple[str, str]:
    """Split a file URI into (store of its parent, file name)."""
    uri = str(uri)
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        parent, _, name = key.rpartition("/")
        return f"s3://{bucket}/{parent}", name
    path = Path(os.path.expanduser(uri))
    return str(path.parent), path.name


def read_bytes(uri: str, s3_options=None) -> bytes:
    parent, name = _parent_and_name(uri)
    return open_store(parent, s3_options).read_bytes(name)


def write_bytes(uri: str, data: bytes, s3_options=None) -> None:
    parent, name = _parent_and_name(uri)
    open_store(parent, s3_options).write_bytes(name, data)


def exists(uri: str, s3_options=None) -> bool:
    parent, name = _parent_and_name(uri)
    return open_store(parent, s3_options).exists(name)


def list_uri(uri: str, s3_options=None) -> list[str]:
    """Every file under a folder/prefix, as names relative to it."""
    return open_store(uri, s3_options).list()


def download(uri: str, local_dir: str | os.PathLike, s3_options=None) -> list[Path]:
    """Copy every file under ``uri`` into ``local_dir`` (keeping relative names); returns the paths.

    Every name is checked before anything is written: an object whose name has '..', '.', an
    empty segment or a leading '/' (it would land outside ``local_dir``) is refused (ValueError)."""
    store = open_store(uri, s3_options)
    names = store.list()
    for name in names:
        try:
            check_relative_name(name, allow_empty=False)
        except ValueError as exc:
            raise ValueError(f"{uri}: refusing to download {exc}") from None
    return [store.download_file(name, Path(local_dir, *name.split("/"))) for name in names]


def upload_dir(local_dir: str | os.PathLike, uri: str, s3_options=None) -> list[str]:
    """Copy every file under ``local_dir`` to ``uri`` (keeping relative names); returns the names."""
    store = open_store(uri, s3_options)
    names = sorted(p.relative_to(local_dir).as_posix() for p in Path(local_dir).rglob("*") if p.is_file())
    for name in names:
        store.upload_file(Path(local_dir, name), name)
    return names


def content_fingerprint(uri: str, s3_options=None) -> list[list]:
    """What identifies the content of a file or of every file under a folder/prefix, cheaply:
    [name, size, mtime_ns] for local files, [name, size, ETag] for S3 objects (sorted by name).

    A changed corpus or model changes this, so a resumable run can tell stale work from good."""
    uri = str(uri)
    if is_s3_uri(uri):
        parent, name = _parent_and_name(uri)
        store = S3Store(parent, s3_options)
        if name:
            from botocore.exceptions import ClientError

            try:
                head = store.client.head_object(Bucket=store.bucket, Key=store._key(name))
                return [[name, int(head["ContentLength"]), head["ETag"]]]
            except ClientError as exc:
                if _error_code(exc) not in _MISSING_CODES:
                    raise
        return [[n, size, etag] for n, size, etag in S3Store(uri, s3_options, client=store.client).list_with_info()]
    path = Path(os.path.expanduser(uri))
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    if path.is_dir():
        out = []
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                out.append([p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns])
        return out
    return []


def default_cache_dir() -> Path:
    """Where downloaded index versions are kept (``RAGGEN_CACHE_DIR`` overrides)."""
    root = os.environ.get("RAGGEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "raggen-cache")
    return Path(root)
