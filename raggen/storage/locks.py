"""A per-root lock file (``flock``): the kernel drops it when its holder dies, so no lock goes stale."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from raggen.storage.common import StoreBusy

logger = logging.getLogger(__name__)


def _holder_text() -> str:
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    )


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

    def acquire(self) -> FileLock:
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

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
