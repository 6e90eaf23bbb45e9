"""The local cache of S3 versions (one folder per version): marked when used, evicted beyond the
most recently used few, never a folder raggen did not make.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_MARKER = ".raggen-cache"  # in a cached version's folder: raggen made it, and when it was last used
CACHE_GRACE_S = 60.0  # a version used this recently is never evicted (another process may be loading it)


def cache_mark_used(version_dir: Path) -> None:
    """Record that this cached version is in use now (eviction keeps the most recently used)."""
    from raggen.storage import atomic_write_bytes

    atomic_write_bytes(
        version_dir / CACHE_MARKER,
        json.dumps({"last_used": time.time(), "pid": os.getpid(), "host": socket.gethostname()}).encode(),
    )


def _last_used(version_dir: Path) -> float | None:
    try:
        return float(json.loads((version_dir / CACHE_MARKER).read_text())["last_used"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evict_cached_versions(root_dir: Path, *, keep: int = 2, keep_names: set[str] = frozenset()) -> list[str]:
    """Delete cached versions under ``root_dir`` (one root's cache folder) beyond the ``keep`` most
    recently used; only folders raggen made (their marker), never ``keep_names`` nor one used in the
    last ``CACHE_GRACE_S``. A process still serving an evicted version keeps its memory maps (the
    files are unlinked, not truncated). Returns the evicted names."""
    import shutil

    from raggen.storage import FileLock

    if not root_dir.is_dir():
        return []
    evicted = []
    with FileLock(root_dir / f"{CACHE_MARKER}.lock", timeout=30.0, what=f"index cache {root_dir}"):
        dated = sorted(
            ((t, d) for d in root_dir.iterdir() if d.is_dir() and (t := _last_used(d)) is not None), reverse=True
        )
        now = time.time()
        for _, d in dated[max(keep, 0) :]:
            t = _last_used(d)  # again: another process may have just marked it
            if d.name in keep_names or t is None or now - t < CACHE_GRACE_S:
                continue
            shutil.rmtree(d, ignore_errors=True)
            evicted.append(d.name)
    if evicted:
        logger.info("index cache %s: evicted %s (keeping the %d most recently used)", root_dir, evicted, keep)
    return evicted
