"""One interface over local folders and ``s3://bucket/prefix``: read, write, list, copy, sha256.

Why one interface: an index is published to a folder on a laptop and to S3 on a cluster, and the
publish/verify logic (raggen.index.manifest) must be the same code for both.

Atomicity: local writes go to a temporary name in the same folder and are renamed with
``os.replace``; an S3 PUT (single or multipart upload) becomes visible all at once when it
completes, so readers never see half an object. The S3 client is plain boto3: endpoint, region,
credentials and retries come from explicit keyword arguments or the standard AWS environment
(``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_MAX_ATTEMPTS``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

logger = logging.getLogger(__name__)

CHUNK = 8 << 20  # bytes read at a time when hashing or copying


# ---------------------------------------------------------------------------------------- hashing


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in chunks so multi-GB shards do not sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- URIs


def is_s3_uri(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``); the key prefix carries no leading/trailing slash."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key.strip("/")


def join_uri(base: str, *parts: str) -> str:
    """Join with '/' for S3 and os.path.join for local paths; empty parts are skipped."""
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if is_s3_uri(base):
        return "/".join([base.rstrip("/"), *parts]) if parts else base.rstrip("/")
    return str(Path(base, *parts))


def _check_relative(rel: str) -> str:
    """Reject names that would escape the store's root (``..``, absolute paths)."""
    rel = rel.replace("\\", "/").strip("/")
    if any(part in ("..",) for part in rel.split("/")) or rel.startswith("/"):
        raise ValueError(f"path escapes the store root: {rel!r}")
    return rel


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
    def write_bytes(self, rel: str, data: bytes) -> None: ...
    def exists(self, rel: str) -> bool: ...
    def list(self, rel: str = "") -> list[str]: ...
    def delete(self, rel: str) -> None: ...
    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None: ...
    def download_file(self, rel: str, local_path: str | os.PathLike) -> Path: ...
    def iter_chunks(self, rel: str) -> Iterator[bytes]: ...


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then os.replace: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


class LocalStore:
    """A folder. Writes are atomic (temporary name + os.replace)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.expanduser(str(root)))
        self.uri = str(self.root)

    def _path(self, rel: str) -> Path:
        rel = _check_relative(rel)
        return self.root / rel if rel else self.root

    def read_bytes(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self._path(rel), data)

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def list(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, recursively, as names relative to the store root (sorted)."""
        base = self._path(rel)
        if not base.is_dir():
            return []
        names = [p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(n for n in names if ".tmp-" not in Path(n).name)

    def delete(self, rel: str) -> None:
        path = self._path(rel)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        atomic_copy_file(local_path, self._path(rel))

    def download_file(self, rel: str, local_path: str | os.PathLike) -> Path:
        atomic_copy_file(self._path(rel), local_path)
        return Path(local_path)

    def iter_chunks(self, rel: str) -> Iterator[bytes]:
        with open(self._path(rel), "rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")

    def local_path(self, rel: str) -> Path:
        """Local stores can be read in place (no copy) by callers that need a path."""
        return self._path(rel)


class S3Store:
    """An S3 prefix through boto3; multipart uploads for large files (each still atomic)."""

    def __init__(self, uri: str, s3_options: S3Options | Mapping[str, Any] | None = None, client=None):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.options = S3Options.coerce(s3_options)
        self.client = client or s3_client(self.options)

    def _key(self, rel: str) -> str:
        rel = _check_relative(rel)
        return "/".join(p for p in (self.prefix, rel) if p)

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"{self.uri}/{rel}") from exc

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, rel: str = "") -> list[str]:
        prefix = self._key(rel)
        prefix = f"{prefix}/" if prefix else ""
        strip = f"{self.prefix}/" if self.prefix else ""
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            names.extend(obj["Key"][len(strip) :] for obj in page.get("Contents", []))
        return sorted(names)

    def delete(self, rel: str) -> None:
        keys = [self._key(n) for n in self.list(rel)] or [self._key(rel)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        self.client.upload_file(str(local_path), self.bucket, self._key(rel))

    def download_file(self, rel: str, local_path: str | os.PathLike) -> Path:
        """Download to a temporary sibling, then rename: an interrupted download leaves no file."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self.client.download_file(self.bucket, self._key(rel), str(tmp))
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)
        return local_path

    def iter_chunks(self, rel: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]
        yield from iter(lambda: body.read(CHUNK), b"")


def open_store(uri: str | os.PathLike, s3_options: S3Options | Mapping[str, Any] | None = None) -> Store:
    """``s3://bucket/prefix`` -> S3Store, anything else -> LocalStore."""
    uri = str(uri)
    return S3Store(uri, s3_options) if is_s3_uri(uri) else LocalStore(uri)


def store_sha256(store: Store, rel: str) -> str:
    """sha256 of a stored object, streamed (no local copy)."""
    digest = hashlib.sha256()
    for chunk in store.iter_chunks(rel):
        digest.update(chunk)
    return digest.hexdigest()


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
    """Copy every file under ``uri`` into ``local_dir`` (keeping relative names); returns the paths."""
    store = open_store(uri, s3_options)
    return [store.download_file(name, Path(local_dir, name)) for name in store.list()]


def upload_dir(local_dir: str | os.PathLike, uri: str, s3_options=None) -> list[str]:
    """Copy every file under ``local_dir`` to ``uri`` (keeping relative names); returns the names."""
    store = open_store(uri, s3_options)
    names = sorted(p.relative_to(local_dir).as_posix() for p in Path(local_dir).rglob("*") if p.is_file())
    for name in names:
        store.upload_file(Path(local_dir, name), name)
    return names


def default_cache_dir() -> Path:
    """Where downloaded index versions are kept (``RAGGEN_CACHE_DIR`` overrides)."""
    root = os.environ.get("RAGGEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "raggen-cache")
    return Path(root)
