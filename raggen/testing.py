"""Fixtures that raggen's tests and benchmarks share (as ``transformers.testing_utils`` does): they
drive a real service or index, so both need the same polling and the same way to plant a version."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    poll_s: float = 0.25,
    retry_on: tuple[type[BaseException], ...] = (),
    error: type[Exception] = AssertionError,
) -> T:
    """``predicate()``'s first truthy value, polled every ``poll_s``; exceptions in ``retry_on`` count as
    "not yet". Past ``timeout_s`` raises ``error`` naming ``what`` and the last value or exception."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(poll_s)
    raise error(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def copy_version(root: str, src: str, dst: str, tamper: bool) -> None:
    """``dst``: a copy of the published version ``src`` (a local index root) renamed in its manifest
    and created now (LATEST moves only forward, by created time); ``tamper`` flips one byte of its
    first shard, so that verification must refuse it."""
    shutil.copytree(Path(root, src), Path(root, dst))
    manifest_path = Path(root, dst, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = dst
    manifest["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    manifest_path.write_text(json.dumps(manifest))
    if tamper:
        shard = Path(root, dst, manifest["shards"][0]["index"])
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
