"""Atomic local writes: a temporary sibling, fsync, ``os.replace``, fsync of the folder; whole-folder swaps."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from raggen.storage.hashing import iter_file_chunks

logger = logging.getLogger(__name__)


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
