"""Hot swap of a Retriever replica's index: :class:`IndexHolder` swaps whole
:class:`~raggen.serve.live_index.LiveIndex` objects under a lock, refuses a bad version, and can
follow the ``LATEST`` pointer with a watcher thread.

Plain Python (no Ray Serve): the Retriever deployment (:mod:`raggen.serve.deployments`) drives it
from ``reconfigure(user_config)`` (:class:`~raggen.serve.live_index.IndexUserConfig`) and hands it
metric hooks (:mod:`raggen.serve.metrics`). A hot swap loads and verifies the new version beside
the old one (:func:`~raggen.serve.live_index.load_live_index`), swaps atomically, and closes the old
one (giving its shard actor group back) only when no in-flight request uses it any more (readers
pin it with :meth:`IndexHolder.use`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index import SwappableIndex
from raggen.serve.live_index import LiveIndex, NoIndexError
from raggen.serve.schemas import IndexInfo

# a child of Serve's logger, so swaps and refusals land in the replica's log file next to Serve's own
log = logging.getLogger("ray.serve").getChild(__name__)


def is_integrity_error(exc: BaseException) -> bool:
    """A version that will never verify (bad checksum, partial upload, wrong dimension, invalid
    name): refused for good. Anything else (timeouts, connection errors, 5xx) may pass on retry."""
    return isinstance(exc, (IndexIntegrityError, ConfigError))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class IndexHolder:
    """Holds the live index; swaps in a verified new version atomically, refuses a bad one.

    A swap loads the new version while the old one keeps serving (readers pin the version they
    search with ``with holder.use() as live:`` once per batch), then replaces the reference; the
    old :class:`LiveIndex` is closed (its shard actor group given back) once the last reader that
    pinned it is done (``raggen.index.SwappableIndex``). Two kinds of failure:

    * an integrity error (:func:`is_integrity_error`: bad checksum, partial version) refuses the
      version for good: ``last_error`` says why, the watcher never loads it again;
    * anything else (an S3 timeout, a connection error, a 5xx) is transient: ``configure`` retries
      it ``retry_attempts`` times with backoff, the watcher keeps retrying it on later ticks with
      exponential backoff (capped at ``max_backoff_s``), and it is never refused.

    When the version asked for (LATEST's, or a pinned one) cannot be served, the replica serves
    the newest version it can verify that is not newer than the one LATEST names (LATEST itself
    first, for a pinned version) and says so (``info()["serving_fallback"]``). Every replica applies
    the same rule to the same store, so a fleet converges on one version, including a replica
    started later by the autoscaler. With nothing verifiable the error propagates (the replica fails).

    ``on_swap(old, new)`` runs after every version change (``old`` None for the first load) and
    ``on_refuse(message)`` after every refusal: the replica's metrics (hooks must not raise).
    """

    def __init__(
        self,
        loader: Callable[[str, str | None], LiveIndex],
        latest_reader: Callable[[str], str | None],
        versions_reader: Callable[[str], list[str]] | None = None,
        on_swap: Callable[[LiveIndex | None, LiveIndex], None] | None = None,
        on_refuse: Callable[[str], None] | None = None,
        *,
        retry_attempts: int = 3,
        retry_backoff_s: float = 0.5,
        max_backoff_s: float = 300.0,
        replica: str | None = None,
    ):
        self._loader = loader
        self._latest_reader = latest_reader
        self._versions_reader = versions_reader
        self._on_swap = on_swap
        self._on_refuse = on_refuse
        self.retry_attempts = max(1, retry_attempts)
        self.retry_backoff_s = retry_backoff_s
        self.max_backoff_s = max_backoff_s
        self.replica = replica
        self._slot = SwappableIndex()  # the live LiveIndex; a swapped-out one closes with its last reader
        self._swap_lock = threading.Lock()
        self._refused: set[tuple[str, str]] = set()  # integrity errors: never loaded again by the watcher
        self._transient: dict[tuple[str, str], tuple[int, float]] = {}  # failures so far, monotonic retry time
        self._watch_stop: threading.Event | None = None
        self.requested: str | None = None
        self.last_error: str | None = None
        self.latest: str | None = None  # what LATEST named at the last read, while following it
        self.wanted: str | None = None  # the version asked for, while it is not the one served
        self._fallback_due = False  # the last fallback stopped at a transient error: try again next tick

    @property
    def _live(self) -> LiveIndex | None:
        return self._slot.current

    @property
    def live(self) -> LiveIndex:
        """The version served now (for what it is; to search it, pin it with :meth:`use`)."""
        live = self._live
        if live is None:
            raise NoIndexError(f"no verified index loaded (last error: {self.last_error})")
        return live

    @contextlib.contextmanager
    def use(self) -> Iterator[LiveIndex]:
        """The live version, pinned: a swap meanwhile does not close it until this block ends."""
        if self._live is None:
            raise NoIndexError(f"no verified index loaded (last error: {self.last_error})")
        with self._slot.use() as live:
            yield live

    def in_flight(self) -> int:
        """Readers inside :meth:`use` now (over every version still open)."""
        return self._slot.in_flight()

    def close(self) -> None:
        """Stop the watcher and release the live index (its reader-pinned versions once they finish)."""
        self.stop_watching()
        with self._swap_lock:
            self._slot.close()

    # ------------------------------------------------------------------------------ one swap

    def swap_to(self, root: str, version: str | None, cancel: threading.Event | None = None) -> bool:
        """Load ``root``@``version`` beside the live index and swap; False (and last_error) if it fails.

        With nothing live the error propagates. ``cancel`` (a stopped watcher's event) drops a swap
        that waited for the lock while a newer ``configure`` ran, so a retired watcher never
        overrides the current user_config.
        """
        with self._swap_lock:
            if cancel is not None and cancel.is_set():
                return False
            self.requested = f"{root}@{version or 'LATEST'}"
            current = self._live
            key = (root, version or "LATEST")
            if current is not None and version is not None and (current.root, current.version) == (root, version):
                return True
            try:
                new = self._loader(root, version)
            except Exception as exc:  # noqa: BLE001 - any failure to load must leave the old index serving
                self._failed(key, exc)
                if current is None:
                    raise
                return False
            self._slot.swap(new)  # the old one closes when its last reader is done
            self._transient.pop(key, None)
            self.last_error = None
            log.info("index swap: now serving %s version %s (%d passages)", root, new.version, new.num_passages)
            self._notify(self._on_swap, current, new)
            return True

    def reopen(self, stale: LiveIndex) -> bool:
        """Load the version ``stale`` serves once more and swap it in, if ``stale`` is still live.

        For a version searched through shard actors that are gone for good (their owner, the
        group registry, died, or their restarts ran out): every search through them fails, and a
        new load borrows a freshly started group. Batches that hit the same failure at once reopen
        it once: the later ones find another live index and return False. A failed load raises
        and leaves ``stale`` live."""
        with self._swap_lock:
            if self._live is not stale:
                return False
            new = self._loader(stale.root, stale.version)
            self._slot.swap(new)  # the stale one closes with its last reader
            log.warning("index: %s version %s reopened (its shard actors were lost)", stale.root, stale.version)
            return True

    def _failed(self, key: tuple[str, str], exc: BaseException) -> None:
        root, version = key
        if is_integrity_error(exc):
            self._refused.add(key)
            self._transient.pop(key, None)
            self.last_error = f"refused {root} version {version}: {_one_line(exc)}"
            log.error("index swap %s", self.last_error)
            self._notify(self._on_refuse, self.last_error)
            return
        failures = self._transient.get(key, (0, 0.0))[0] + 1
        wait = min(self.max_backoff_s, self.retry_backoff_s * 2 ** (failures - 1))
        self._transient[key] = (failures, time.monotonic() + wait)
        self.last_error = f"cannot load {root} version {version} yet (attempt {failures}, will retry): {_one_line(exc)}"
        log.warning("index swap: %s", self.last_error)

    def _swap_retrying(self, root: str, version: str | None) -> bool:
        """:meth:`swap_to`, with up to ``retry_attempts`` tries of a transient failure. Returns False
        (or raises, with nothing live) once a failure is an integrity error or the tries run out."""
        for attempt in range(self.retry_attempts):
            try:
                if self.swap_to(root, version):
                    return True
            except Exception as exc:  # noqa: BLE001 - nothing live: retry, then let the caller fall back
                if is_integrity_error(exc) or attempt + 1 >= self.retry_attempts:
                    raise
            else:
                if (root, version or "LATEST") in self._refused or attempt + 1 >= self.retry_attempts:
                    return False
            time.sleep(min(self.max_backoff_s, self.retry_backoff_s * 2**attempt))
        return False

    def _read_latest_retrying(self, root: str) -> str | None:
        for attempt in range(self.retry_attempts):
            try:
                return self._latest_reader(root)
            except Exception as exc:  # noqa: BLE001 - transient unless it is an integrity error
                if is_integrity_error(exc) or attempt + 1 >= self.retry_attempts:
                    raise
                log.warning(
                    "index: cannot read %s LATEST (attempt %d, will retry): %s", root, attempt + 1, _one_line(exc)
                )
                time.sleep(min(self.max_backoff_s, self.retry_backoff_s * 2**attempt))
        return None

    @staticmethod
    def _notify(hook: Callable[..., None] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - a metrics hook must never change what is served
            log.exception("index holder hook failed")

    # ------------------------------------------------------------------------------ user_config

    def configure(
        self, index: str, version: str | None = None, watch_latest: bool = False, watch_interval_s: float = 10.0
    ) -> bool:
        """Apply a ``user_config``: load the named version (or LATEST's), then (re)start the watcher.

        True when the version asked for is served. An explicit request loads again even a version
        refused before (the operator may have fixed it). Raises when nothing can be served.
        """
        self.stop_watching()
        try:
            target = version if version is not None else self._read_latest_retrying(index)
        except Exception as exc:  # noqa: BLE001 - an unreachable store is a refusal, not a crash
            self.refuse(f"refused {index} LATEST: cannot read it: {_one_line(exc)}")
            ok = False
        else:
            if version is None:
                self.latest = target
            if target is not None:
                self._refused.discard((index, target))
            ok = self._serve(index, target, following=version is None)
        if watch_latest:
            self._start_watching(index, watch_interval_s)
        return ok

    def _serve(self, root: str, target: str | None, following: bool) -> bool:
        """Serve ``target`` (None: nothing published; the loader says so). If it fails: with nothing
        live, or while following LATEST (so that every replica ends on the same version), serve the
        fallback; a pinned version that fails leaves the live one serving."""
        try:
            ok = self._swap_retrying(root, target)
        except Exception:  # noqa: BLE001 - nothing live yet: fall back before failing the replica
            if target is None:
                raise
            self.wanted = target
            if not self._fall_back(root, target):
                raise
            return False
        self.wanted = None if ok else target
        if not ok and following and target is not None:
            self._fall_back(root, target)
        return ok

    def _fall_back(self, root: str, failed: str) -> bool:
        """After ``failed`` could not be served: serve the newest version that verifies and is not
        newer than the one LATEST names (LATEST's own first when it is another version). True when
        something is live afterwards. Stops at the live version: nothing newer verified."""
        reason = self.last_error
        self._fallback_due = False
        try:
            latest = self._latest_reader(root)
            ordered = self._versions_reader(root) if self._versions_reader is not None else []
        except Exception as exc:  # noqa: BLE001 - keep what is live; the caller decides with nothing live
            log.error("index fallback: cannot list %s: %s", root, _one_line(exc))
            self._fallback_due = self._live is not None
            self.last_error = reason
            return self._live is not None
        if latest is not None:
            self.latest = latest
        if latest in ordered:  # only versions LATEST has reached: not one still being published
            ordered = ordered[ordered.index(latest) + 1 :]
        candidates = ([latest] if latest is not None and latest != failed else []) + [
            v for v in ordered if v not in (failed, latest)
        ]
        for candidate in candidates:
            live = self._live
            if live is not None and (live.root, live.version) == (root, candidate):
                break
            if (root, candidate) in self._refused:
                continue
            try:
                if self.swap_to(root, candidate):
                    break
            except Exception:  # noqa: BLE001 - nothing live: try the next older one
                continue
            if (root, candidate) not in self._refused:  # transient with something live: retry next tick
                self._fallback_due = True
                break
        live = self._live
        if live is None:
            self.last_error = reason
            return False
        self.requested = f"{root}@{failed}"
        self.last_error = f"{reason}; serving {live.version} instead (the newest version that verifies)"
        log.error("index fallback: %s", self.last_error)
        return True

    # ------------------------------------------------------------------------------ watcher

    def poll_latest(self, root: str, cancel: threading.Event | None = None) -> bool:
        """One watcher tick: swap to the version LATEST names if it is new, not refused, and not
        waiting out the backoff of a transient failure; after a failure, serve the fallback."""
        latest = self._latest_reader(root)
        self.latest = latest
        if latest is None:
            return False
        current = self._live
        if current is not None and (current.root, current.version) == (root, latest):
            self.wanted = None
            return False
        key = (root, latest)
        if key in self._refused:
            if self.wanted != latest or self._fallback_due:  # LATEST moved onto a refused version
                self.wanted = latest
                self._fall_back(root, latest)
            return False
        failures, not_before = self._transient.get(key, (0, 0.0))
        if failures and time.monotonic() < not_before:
            return False
        ok = self.swap_to(root, latest, cancel)
        if ok:
            self.wanted = None
            return True
        if cancel is not None and cancel.is_set():
            return False
        self.wanted = latest
        if key in self._refused:
            self._fall_back(root, latest)
        return False

    def _start_watching(self, root: str, interval_s: float) -> None:
        stop = threading.Event()
        self._watch_stop = stop

        def watch() -> None:
            while not stop.wait(interval_s):
                try:
                    self.poll_latest(root, stop)
                except Exception as exc:  # noqa: BLE001 - a flaky store must not kill the watcher
                    log.warning("index watcher: cannot follow %s/LATEST: %s", root, _one_line(exc))

        threading.Thread(target=watch, name="raggen-index-watcher", daemon=True).start()

    def refuse(self, message: str) -> None:
        """Record a refused request (e.g. an invalid user_config); with nothing live it is fatal."""
        self.last_error = message
        self._notify(self._on_refuse, message)
        if self._live is None:
            raise ConfigError(message)
        log.error("index swap refused: %s", message)

    def stop_watching(self) -> None:
        if self._watch_stop is not None:
            self._watch_stop.set()
            self._watch_stop = None

    def info(self) -> dict[str, Any]:
        live = self.live
        return IndexInfo(
            version=live.version,
            index=live.root,
            num_passages=live.num_passages,
            loaded_at=live.loaded_at,
            requested=self.requested,
            last_error=self.last_error,
            latest=self.latest,
            serving_fallback=self.wanted is not None and self.wanted != live.version,
            replica=self.replica,
        ).model_dump()
