"""Relative names and URIs: what a safe key is, ``s3://`` splitting and joining, temporary names."""

from __future__ import annotations

import logging
from pathlib import Path

from raggen.storage.common import _TMP_TAG

logger = logging.getLogger(__name__)


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
        raise ValueError(
            f"unsafe object name {rel!r}: it escapes the store root ('..', '.', empty segments and "
            "absolute names are refused)"
        )
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
