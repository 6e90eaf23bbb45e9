"""A cache file read at offsets with ``os.pread``: thread-safe (no shared file position) and never
memory-mapped, so a reader holds only the bytes of the call it is answering (a mapped file's random
reads would also fault in the pages around each one). What ``passage_blocks`` and
``passage_vectors`` read their files through."""

from __future__ import annotations

import os
from pathlib import Path


class PreadFile:
    """An open read-only file: ``read(size, offset)``; its descriptor is closed once, by ``close()``
    or when the object is dropped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)

    @property
    def fd(self) -> int:
        return self._fd

    def read(self, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()
