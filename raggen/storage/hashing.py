"""sha256 of bytes, chunks and files, streamed (never a whole-file read)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from typing import IO

from raggen.storage.common import CHUNK

logger = logging.getLogger(__name__)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def iter_file_chunks(f: IO[bytes], size: int = CHUNK, limit: int | None = None) -> Iterator[bytes]:
    """``f``'s bytes from its position in chunks of ``size``; only the first ``limit`` when given."""
    if limit is None:
        yield from iter(lambda: f.read(size), b"")
        return
    while limit > 0 and (chunk := f.read(min(size, limit))):
        limit -= len(chunk)
        yield chunk


class HashingWriter:
    """Writes through to a binary file and hashes what it writes (a file checked by its own sha256
    without reading it back); ``pos`` counts the bytes written."""

    def __init__(self, file: IO[bytes]):
        self.file, self.sha, self.pos = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.pos += len(data)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in chunks so multi-GB shards do not sit in memory twice."""
    with open(path, "rb") as f:
        return sha256_chunks(iter_file_chunks(f))
