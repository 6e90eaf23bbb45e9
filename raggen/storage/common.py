"""What every storage module shares: the errors and the names of raggen's own files."""

from __future__ import annotations

from raggen.errors import RaggenError

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
