"""One Store interface over a local folder and an S3 prefix, with conditional writes."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from raggen.storage.atomic import AtomicFile, atomic_copy_file, atomic_write_bytes
from raggen.storage.common import CHUNK, LOCK_NAME, ChecksumMismatch, PreconditionFailed
from raggen.storage.hashing import iter_file_chunks, sha256_bytes, sha256_chunks
from raggen.storage.locks import FileLock
from raggen.storage.names import _is_temp_name, check_relative_name, is_s3_uri, split_s3_uri
from raggen.storage.s3 import S3Options, s3_client

logger = logging.getLogger(__name__)


class Store(Protocol):
    """A root (folder or S3 prefix); every name is relative to it and uses '/'."""

    uri: str

    def read_bytes(self, rel: str) -> bytes: ...
    def read_with_etag(self, rel: str) -> tuple[bytes, str]: ...
    def write_bytes(
        self, rel: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str: ...
    def exists(self, rel: str) -> bool: ...
    def list(self, rel: str = "") -> list[str]: ...
    def delete(self, rel: str) -> None: ...
    def delete_file(self, rel: str) -> None: ...
    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None: ...
    def download_file(self, rel: str, local_path: str | os.PathLike) -> Path: ...
    def iter_chunks(self, rel: str) -> Iterator[bytes]: ...


def _check_conditions(if_none_match: bool, if_match: str | None) -> None:
    if if_none_match and if_match is not None:
        raise ValueError("write_bytes: if_none_match and if_match exclude each other")


class LocalStore:
    """A folder. Writes are atomic (:class:`AtomicFile`); conditional writes hold the root's lock."""

    def __init__(self, root: str | os.PathLike, *, lock_timeout: float = 60.0):
        self.root = Path(os.path.expanduser(str(root)))
        self.uri = str(self.root)
        self.lock_timeout = lock_timeout

    def _path(self, rel: str) -> Path:
        rel = check_relative_name(rel)
        return self.root / rel if rel else self.root

    def lock(self, timeout: float | None = None) -> FileLock:
        """The root's lock (``<root>/.raggen-lock``): what makes conditional writes atomic here."""
        return FileLock(self.root / LOCK_NAME, timeout=self.lock_timeout if timeout is None else timeout,
                        what=f"{self.uri}")  # fmt: skip

    def read_bytes(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def read_with_etag(self, rel: str) -> tuple[bytes, str]:
        data = self.read_bytes(rel)
        return data, sha256_bytes(data)

    def write_bytes(self, rel: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write atomically; with a condition, check and write under the root's lock. Returns the etag."""
        _check_conditions(if_none_match, if_match)
        path = self._path(rel)
        if not if_none_match and if_match is None:
            atomic_write_bytes(path, data)
            return sha256_bytes(data)
        with self.lock():
            if if_none_match and path.exists():
                raise PreconditionFailed(f"{path}: exists")
            if if_match is not None:
                current = sha256_bytes(path.read_bytes()) if path.is_file() else None
                if current != if_match:
                    raise PreconditionFailed(f"{path}: changed since it was read")
            atomic_write_bytes(path, data)
        return sha256_bytes(data)

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def list(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, recursively, as names relative to the store root (sorted);
        temporary files and the lock file are not listed."""
        base = self._path(rel)
        if not base.is_dir():
            return []
        names = [p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(n for n in names if not _is_temp_name(n) and n != LOCK_NAME)

    def delete(self, rel: str) -> None:
        """Remove a file, or a folder with everything in it (callers own what they delete)."""
        path = self._path(rel)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def delete_file(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        atomic_copy_file(local_path, self._path(rel))

    def download_file(self, rel: str, local_path: str | os.PathLike) -> Path:
        atomic_copy_file(self._path(rel), local_path)
        return Path(local_path)

    def iter_chunks(self, rel: str) -> Iterator[bytes]:
        with open(self._path(rel), "rb") as f:
            yield from iter_file_chunks(f)

    def local_path(self, rel: str) -> Path:
        """Local stores can be read in place (no copy) by callers that need a path."""
        return self._path(rel)


_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def _error_code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Store:
    """An S3 prefix through boto3; multipart uploads for large files (each still atomic)."""

    def __init__(self, uri: str, s3_options: S3Options | Mapping[str, Any] | None = None, client=None):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.options = S3Options.coerce(s3_options)
        self.client = client or s3_client(self.options)

    def _key(self, rel: str) -> str:
        rel = check_relative_name(rel)
        return "/".join(p for p in (self.prefix, rel) if p)

    def _get(self, rel: str):
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise FileNotFoundError(errno.ENOENT, "no such S3 object", f"{self.uri}/{rel}") from None
            raise

    def read_bytes(self, rel: str) -> bytes:
        return self._get(rel)["Body"].read()

    def read_with_etag(self, rel: str) -> tuple[bytes, str]:
        obj = self._get(rel)
        return obj["Body"].read(), obj["ETag"]

    def write_bytes(self, rel: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """PutObject; ``if_none_match`` -> ``IfNoneMatch="*"``, ``if_match`` -> ``IfMatch``. Returns the ETag."""
        from botocore.exceptions import ClientError

        _check_conditions(if_none_match, if_match)
        kwargs: dict[str, Any] = {}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, **kwargs)["ETag"]
        except ClientError as exc:
            code = _error_code(exc)
            if kwargs and (code in _CONFLICT_CODES or code in _MISSING_CODES):
                raise PreconditionFailed(f"{self.uri}/{rel}: {code}") from None
            raise

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return False
            raise

    def list(self, rel: str = "") -> list[str]:
        """Every object under ``rel`` as names relative to the root (sorted); "folder" marker keys
        (ending in '/') are not objects of ours and are skipped."""
        prefix = self._key(rel)
        prefix = f"{prefix}/" if prefix else ""
        strip = f"{self.prefix}/" if self.prefix else ""
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            names.extend(obj["Key"][len(strip) :] for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
        return sorted(names)

    def list_with_info(self, rel: str = "") -> list[tuple[str, int, str]]:
        """(name, size, ETag) of every object under ``rel``."""
        prefix = self._key(rel)
        prefix = f"{prefix}/" if prefix else ""
        strip = f"{self.prefix}/" if self.prefix else ""
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend((o["Key"][len(strip) :], int(o["Size"]), o["ETag"]) for o in page.get("Contents", [])
                       if not o["Key"].endswith("/"))  # fmt: skip
        return sorted(out)

    def delete(self, rel: str) -> None:
        """Remove an object, or every object under the prefix ``rel`` (callers own what they delete)."""
        keys = [self._key(n) for n in self.list(rel)] or [self._key(rel)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def delete_file(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        self.client.upload_file(str(local_path), self.bucket, self._key(rel))

    def download_file(self, rel: str, local_path: str | os.PathLike) -> Path:
        """Download to a temporary sibling, then rename: an interrupted download leaves no file."""
        local_path = Path(local_path)
        with AtomicFile(local_path, "wb", compress=False) as f:
            self.client.download_fileobj(self.bucket, self._key(rel), f)
        return local_path

    def iter_chunks(self, rel: str) -> Iterator[bytes]:
        body = self._get(rel)["Body"]
        try:
            yield from iter(lambda: body.read(CHUNK), b"")
        finally:
            body.close()


def open_store(uri: str | os.PathLike, s3_options: S3Options | Mapping[str, Any] | None = None) -> Store:
    """``s3://bucket/prefix`` -> S3Store, anything else -> LocalStore."""
    uri = str(uri)
    return S3Store(uri, s3_options) if is_s3_uri(uri) else LocalStore(uri)


def store_sha256(store: Store, rel: str) -> str:
    """sha256 of a stored object, streamed from the store itself (no local copy)."""
    return sha256_chunks(store.iter_chunks(rel))


def copy_to_local(store: Store, rel: str, local_path: str | os.PathLike, expected_sha256: str | None = None) -> str:
    """Stream ``rel`` from the store into ``local_path`` (atomically), hashing the bytes as they
    arrive; returns their sha256. With ``expected_sha256``, a mismatch leaves no file and raises
    :class:`ChecksumMismatch` (the caller names the object)."""
    digest = hashlib.sha256()
    out = AtomicFile(local_path, "wb", compress=False)
    size = 0
    try:
        for chunk in store.iter_chunks(rel):
            digest.update(chunk)
            out.file.write(chunk)
            size += len(chunk)
    except BaseException:
        out.abort()
        raise
    got = digest.hexdigest()
    if expected_sha256 is not None and got != expected_sha256:
        out.abort()
        raise ChecksumMismatch(got, expected_sha256, size)
    out.commit()
    return got
