"""Hot swap: ``SwappableIndex`` holds the live index, ``swap`` installs a new (verified) one
atomically and closes the old one once the last search that uses it has returned (reference
counting).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np

from raggen.index.sharded import ShardedIndex


class SwappableIndex:
    """The live index of a long-running caller (a Serve replica, a trainer), replaceable in use.

    ``search`` pins the index it starts on (reference count) and releases it after; ``swap(new)``
    replaces it atomically: searches already running finish on the old index, new ones use the new
    one, and the old one is closed (its actor group ended, when it owns one) as soon as the last
    search using it returns (at once when none does). Start and verify the new index beside the
    old one first (``open_index`` / ``ShardActorGroup.start``), then swap: a failed start never
    touches the live index."""

    def __init__(self, index: ShardedIndex | None = None):
        self._lock = threading.Lock()
        self._index = index
        self._pins: dict[int, int] = {}  # id(index) -> searches in flight
        self._retired: dict[int, ShardedIndex] = {}  # swapped out, closed when their pins reach 0

    @property
    def current(self) -> ShardedIndex | None:
        return self._index

    @contextlib.contextmanager
    def use(self) -> Iterator[ShardedIndex]:
        with self._lock:
            index = self._index
            if index is None:
                raise RuntimeError("no index to search yet")
            self._pins[id(index)] = self._pins.get(id(index), 0) + 1
        try:
            yield index
        finally:
            done = None
            with self._lock:
                key = id(index)
                self._pins[key] -= 1
                if self._pins[key] == 0:
                    del self._pins[key]
                    done = self._retired.pop(key, None)
            if done is not None:
                done.close()

    def search(self, xq: np.ndarray, k: int, **kwargs):
        with self.use() as index:
            return index.search(xq, k, **kwargs)

    def swap(self, new: ShardedIndex) -> ShardedIndex | None:
        """Install ``new``; the old index is closed once no search uses it. Returns the old one."""
        with self._lock:
            old, self._index = self._index, new
            close_now = old is not None and old is not new and id(old) not in self._pins
            if old is not None and old is not new and not close_now:
                self._retired[id(old)] = old
        if close_now:
            old.close()
        return old

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._pins.values())

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every swapped-out index has been closed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._retired:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        with self._lock:
            index, self._index = self._index, None
        if index is not None and id(index) not in self._pins:
            index.close()
        elif index is not None:
            with self._lock:
                self._retired[id(index)] = index
