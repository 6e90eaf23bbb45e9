"""One interface over local folders and ``s3://bucket/prefix``: read, write, list, copy, sha256,
atomic local writes, locks, conditional writes and folders that raggen owns.

Why one interface: an index is published to a folder on a laptop and to S3 on a cluster, and the
publish/verify logic (raggen.index.manifest) must be the same code for both.

Atomicity: every local file raggen writes goes through :class:`AtomicFile` (a temporary name in
the same folder, fsync, ``os.replace``, fsync of the folder; the temporary file is removed on
failure) and gets the mode the user's umask gives (0644 under umask 022), never mkstemp's 0600.
A folder is replaced as a whole with :func:`atomic_directory`. An S3 PUT (single or multipart)
becomes visible all at once when it completes, so readers never see half an object.

Concurrency: ``write_bytes(..., if_none_match=True)`` creates a name only if it does not exist
and ``write_bytes(..., if_match=etag)`` replaces it only if nobody changed it since it was read.
S3 does this itself (``IfNoneMatch="*"`` / ``IfMatch`` on PutObject); a local folder does it under
a per-root lock file (:class:`FileLock`: ``flock``, the holder's pid and host inside; the kernel
drops the lock when its holder dies, so a killed process never leaves a stale lock).

Deletion: raggen deletes only folders it created. :func:`claim_folder` writes a marker file into
a folder it creates (or into an empty one it is given); :func:`release_folder` removes a folder
only when the marker is there; a non-empty folder without the marker is refused, never deleted.

The S3 client is plain boto3: endpoint, region, credentials and retries come from explicit keyword
arguments or the standard AWS environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_MAX_ATTEMPTS``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Protocol

from raggen.errors import ConfigError, RaggenError

logger = logging.getLogger(__name__)

CHUNK = 8 << 20  # bytes read at a time when hashing or copying
LOCK_NAME = ".raggen-lock"  # the per-root lock file of a local store
_TMP_TAG = ".tmp-"  # every temporary name holds this; listings skip such names


class PreconditionFailed(RaggenError):
    """A conditional write lost: the name exists (``if_none_match``) or changed (``if_match``)."""


class ChecksumMismatch(ValueError):
    """Bytes whose sha256 is not the expected one (``got``, ``expected``, ``size`` in bytes)."""

    def __init__(self, got: str, expected: str, size: int):
        super().__init__(f"sha256 {got} of {size} bytes differs from the expected {expected}")
        self.got, self.expected, self.size = got, expected, size


class StoreBusy(RaggenError):
    """A lock is held by another process (its pid and host are in the message)."""


# ---------------------------------------------------------------------------------------- hashing


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def iter_file_chunks(f: IO[bytes], size: int = CHUNK) -> Iterator[bytes]:
    yield from iter(lambda: f.read(size), b"")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in chunks so multi-GB shards do not sit in memory twice."""
    with open(path, "rb") as f:
        return sha256_chunks(iter_file_chunks(f))


# ---------------------------------------------------------------------------------------- names and URIs


def check_relative_name(rel: str, *, allow_empty: bool = True) -> str:
    """A name relative to a store root: '/'-separated, no '..' or '.' segment, no empty segment,
    not absolute, no backslash or NUL. Returns it unchanged; raises ValueError otherwise."""
    if not isinstance(rel, str):
        raise ValueError(f"object name must be a string, got {type(rel).__name__}")
    if rel == "":
        if allow_empty:
            return rel
        raise ValueError("object name is empty")
    bad = (rel.startswith("/") or "\\" in rel or "\x00" in rel or (len(rel) > 1 and rel[1] == ":")
           or any(part in ("", ".", "..") for part in rel.split("/")))  # fmt: skip
    if bad:
        raise ValueError(f"unsafe object name {rel!r}: it escapes the store root ('..', '.', empty segments and "
                         "absolute names are refused)")
    return rel


def is_s3_uri(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``); the key prefix carries no leading/trailing slash.

    A prefix with '..', '.' or empty segments (``s3://b/a//c``) is refused (ValueError)."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    key = key[:-1] if key.endswith("/") else key
    try:
        check_relative_name(key)
    except ValueError:
        raise ValueError(f"{uri}: unsafe S3 prefix ('..', '.', empty segments or a leading '/')") from None
    return bucket, key


def join_uri(base: str, *parts: str) -> str:
    """Join with '/' for S3 and os.path.join for local paths; empty parts are skipped, and a part
    with '..', '.', an empty segment or a leading '/' is refused (ValueError)."""
    parts = tuple(p[:-1] if p.endswith("/") and len(p) > 1 else p for p in parts if p)
    for p in parts:
        check_relative_name(p, allow_empty=False)
    if is_s3_uri(base):
        return "/".join([base.rstrip("/"), *parts]) if parts else base.rstrip("/")
    return str(Path(base, *parts))


def _is_temp_name(name: str) -> bool:
    return _TMP_TAG in Path(name).name


# ---------------------------------------------------------------------------------------- atomic local writes


def _temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A name in ``path``'s folder unique to this process and call: ``.<name>.tmp-<pid>-<hex>``."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A file written under a temporary name and published with :meth:`commit` in one step.

    ``mode``: "wb" (binary) or "w" (UTF-8 text, ``newline=""``); a ``.gz`` path is gzip-compressed
    unless ``compress=False``. Readers see the old file or the new one, never half of it; a failed
    write (:meth:`abort`, or an exception inside ``with``) removes the temporary file and leaves
    the old file in place. The new file has the mode the umask gives (``0o666 & ~umask``).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", *, compress: bool | None = None):
        if mode not in ("wb", "w"):
            raise ValueError(f"AtomicFile mode must be 'wb' or 'w', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = _temp_sibling(self.path)
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._raw = os.fdopen(fd, "wb")
        self._layers: list[IO] = []
        f: IO = self._raw
        if self.path.name.endswith(".gz") if compress is None else compress:
            f = gzip.GzipFile(filename=self.path.name[:-3], mode="wb", fileobj=f, mtime=0)
            self._layers.append(f)
        if mode == "w":
            f = io.TextIOWrapper(f, encoding="utf-8", newline="")
            self._layers.append(f)
        self.file = f
        self._done = False

    def commit(self) -> Path:
        if self._done:
            raise RuntimeError(f"{self.path}: already committed or aborted")
        try:
            for layer in reversed(self._layers):  # text wrapper first, then gzip: each flushes into the next
                layer.flush()
                if isinstance(layer, gzip.GzipFile):
                    layer.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for f in (*reversed(self._layers), self._raw):
            with contextlib.suppress(Exception):
                f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)

    def __enter__(self) -> IO:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_writer(path) as f: ...``: an :class:`AtomicFile` (text for "w", bytes for "wb")."""
    with AtomicFile(path, "wb" if "b" in mode else "w") as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old or the new file."""
    with AtomicFile(path, "wb", compress=False) as f:
        f.write(data)


def atomic_copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Copy ``src`` to ``dst`` atomically, streaming; returns the sha256 of the bytes copied."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, AtomicFile(dst, "wb", compress=False) as fout:
        for chunk in iter_file_chunks(fin):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary sibling name; on success it replaces ``path`` as a whole.

    Yields the temporary folder. On an exception the temporary folder is removed and ``path`` is
    untouched; on success the old ``path`` (if any) is renamed aside, the new one renamed in,
    the old one removed. The caller decides that replacing ``path`` is allowed (raggen replaces only
    folders it created). Both folders are on one file system, so each rename is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        for p in sorted(tmp.rglob("*"), reverse=True):  # make the new files durable before the swap
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = _temp_sibling(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------- locks


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


class FileLock:
    """An exclusive lock on a lock file (``flock``), reentrant within one thread.

    The holder's pid, host and start time are written into the file for error messages. The
    kernel drops an ``flock`` when its holder dies (``kill -9`` included), so a dead holder never
    blocks anyone: there is no stale lock to clean up. The file itself is never deleted (deleting a
    lock file lets two processes lock two different files). ``timeout=0``: fail at once.
    """

    _held: dict[str, tuple[int, int, int]] = {}  # realpath -> (thread id, depth, fd), this process
    _guard = threading.Lock()

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0, what: str | None = None):
        self.path = Path(path)
        self.timeout = timeout
        self.what = what or str(self.path)

    def _key(self) -> str:
        return os.path.realpath(self.path)

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def acquire(self) -> "FileLock":
        key = self._key()
        with self._guard:
            held = self._held.get(key)
            if held is not None and held[0] == threading.get_ident():
                self._held[key] = (held[0], held[1] + 1, held[2])
                self._held_key = key
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreBusy(f"{self.what}: locked by {self.holder()} (lock file {self.path})") from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        with self._guard:
            self._held[key] = (threading.get_ident(), 1, fd)
        self._held_key = key
        return self

    def release(self) -> None:
        key = getattr(self, "_held_key", None) or self._key()
        with self._guard:
            tid, depth, fd = self._held[key]
            if depth > 1:
                self._held[key] = (tid, depth - 1, fd)
                return
            del self._held[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


# ---------------------------------------------------------------------------------------- S3 options


@dataclass(frozen=True)
class S3Options:
    """How to reach S3; every ``None`` falls back to the standard AWS environment / config files."""

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    max_attempts: int | None = None  # total attempts per request, first try included (default 5)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    @classmethod
    def coerce(cls, value: "S3Options | Mapping[str, Any] | None") -> "S3Options":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"s3_options: unknown field(s) {sorted(unknown)}")
        return cls(**dict(value))

    def resolved(self) -> "S3Options":
        """Fill the unset fields from the AWS environment (what boto3 would pick up itself)."""
        env = os.environ
        attempts = self.max_attempts or int(env.get("AWS_MAX_ATTEMPTS", "5"))
        return S3Options(
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region_name=self.region_name or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            aws_access_key_id=self.aws_access_key_id or env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=self.aws_secret_access_key or env.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=self.aws_session_token or env.get("AWS_SESSION_TOKEN"),
            max_attempts=attempts,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def s3_client(options: S3Options | Mapping[str, Any] | None = None):
    """A boto3 S3 client with explicit endpoint/region/credentials and botocore standard retries."""
    import boto3
    from botocore.config import Config

    opts = S3Options.coerce(options).resolved()
    config = Config(
        # total attempts, first try included (what AWS_MAX_ATTEMPTS means); botocore's own
        # ``max_attempts`` key counts retries only
        retries={"total_max_attempts": opts.max_attempts, "mode": "standard"},
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        s3={"addressing_style": "path"} if opts.endpoint_url else None,
    )
    return boto3.client(
        "s3",
        endpoint_url=opts.endpoint_url,
        region_name=opts.region_name or "us-east-1",
        aws_access_key_id=opts.aws_access_key_id,
        aws_secret_access_key=opts.aws_secret_access_key,
        aws_session_token=opts.aws_session_token,
        config=config,
    )


def pyarrow_s3_filesystem(options: S3Options | Mapping[str, Any] | None = None):
    """The same S3 settings as a ``pyarrow.fs.S3FileSystem`` (what Ray Data's readers take)."""
    from pyarrow import fs

    opts = S3Options.coerce(options).resolved()
    kwargs: dict[str, Any] = {
        "region": opts.region_name or "us-east-1",
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=opts.max_attempts or 5),
        "connect_timeout": opts.connect_timeout,
        "request_timeout": opts.read_timeout,
    }
    if opts.aws_access_key_id and opts.aws_secret_access_key:
        kwargs.update(access_key=opts.aws_access_key_id, secret_key=opts.aws_secret_access_key)
        if opts.aws_session_token:
            kwargs["session_token"] = opts.aws_session_token
    if opts.endpoint_url:
        scheme, _, host = opts.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/") if host else scheme, scheme=scheme if host else "https")
    return fs.S3FileSystem(**kwargs)


# ---------------------------------------------------------------------------------------- stores


class Store(Protocol):
    """A root (folder or S3 prefix); every name is relative to it and uses '/'."""

    uri: str

    def read_bytes(self, rel: str) -> bytes: ...
    def read_with_etag(self, rel: str) -> tuple[bytes, str]: ...
    def write_bytes(self, rel: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str: ...
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


# ---------------------------------------------------------------------------------------- URI-level helpers


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


# ---------------------------------------------------------------------------------------- folders raggen owns


def check_claimable(uri: str | os.PathLike, marker: str, *, what: str, s3_options=None) -> dict | None:
    """The marker of a folder raggen owns, None for a folder it may claim (absent or empty);
    anything else is a ConfigError naming ``what`` (nothing is touched)."""
    uri = str(uri)
    store = open_store(uri, s3_options)
    if isinstance(store, LocalStore) and store.root.exists() and not store.root.is_dir():
        raise ConfigError(f"{what}: {uri} is a file, expected a folder")
    try:
        return json.loads(store.read_bytes(marker))
    except FileNotFoundError:
        pass
    except ValueError:
        raise ConfigError(f"{what}: {join_uri(uri, marker)} is not a raggen marker file; refusing to use {uri}") from None
    if isinstance(store, LocalStore):  # (a lock file alone is what a claim racing this one leaves)
        entries = [e for e in store.root.iterdir() if e.name != LOCK_NAME] if store.root.is_dir() else []
    else:
        entries = store.list()
    if entries:
        raise ConfigError(
            f"{what}: {uri} is not empty and was not created by raggen (no {marker} marker); refusing to use "
            "or delete it. Give a new or empty folder"
        )
    return None


def claim_folder(uri: str | os.PathLike, marker: str, *, what: str, s3_options=None) -> dict:
    """Make ``uri`` (a local folder or an S3 prefix) a folder raggen owns, and return its marker.

    - absent: created, with ``marker`` written in it (``created_dir: true``);
    - empty: ``marker`` written in it (``created_dir: false``: the folder itself stays);
    - holding ``marker``: raggen made it before; its marker is returned;
    - anything else: ConfigError naming ``what``; nothing is touched.
    The marker holds a random ``id`` that stays with the folder.
    """
    uri = str(uri)
    store = open_store(uri, s3_options)
    created = isinstance(store, LocalStore) and not store.root.exists()
    info = check_claimable(uri, marker, what=what, s3_options=s3_options)
    if info is not None:
        return info
    info = {"created_by": "raggen", "what": what, "created_dir": created, "id": secrets.token_hex(6),
            "pid": os.getpid(), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    if isinstance(store, LocalStore):
        store.root.mkdir(parents=True, exist_ok=True)
    try:
        store.write_bytes(marker, (json.dumps(info) + "\n").encode(), if_none_match=True)
    except PreconditionFailed:  # another run claimed it at the same moment: it is raggen's, take its marker
        return json.loads(store.read_bytes(marker))
    return info


def owns_folder(uri: str | os.PathLike, marker: str, s3_options=None) -> bool:
    try:
        return open_store(str(uri), s3_options).exists(marker)
    except ValueError:
        return False


def release_folder(uri: str | os.PathLike, marker: str, *, s3_options=None) -> bool:
    """Delete a folder raggen owns (``marker`` inside): the whole folder when raggen created it,
    else what is in it. A folder without the marker is left alone (returns False)."""
    uri = str(uri)
    store = open_store(uri, s3_options)
    try:
        info = json.loads(store.read_bytes(marker))
    except (FileNotFoundError, ValueError):
        logger.warning("%s: no %s marker; not deleting a folder raggen did not create", uri, marker)
        return False
    if isinstance(store, LocalStore):
        if info.get("created_dir", False):
            shutil.rmtree(store.root, ignore_errors=True)
        else:
            for entry in store.root.iterdir():
                if entry.name == marker:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            store.delete_file(marker)
    else:
        keys = [store._key(n) for n in store.list() if n != marker]
        for i in range(0, len(keys), 1000):  # the marker goes last: a half-removed folder stays raggen's
            store.client.delete_objects(Bucket=store.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]],
                                                                     "Quiet": True})  # fmt: skip
        store.delete_file(marker)
    return True
