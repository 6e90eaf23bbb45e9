"""The live index of a Retriever replica: load a verified version, hot-swap it, refuse a bad one.

Plain Python (no Ray Serve): :class:`IndexHolder` swaps whole :class:`LiveIndex` objects under a
lock and can follow the ``LATEST`` pointer with a watcher thread; the Retriever deployment
(:mod:`raggen.serve.deployments`) drives it from ``reconfigure(user_config)``
(:class:`IndexUserConfig`) and hands it metric hooks (:mod:`raggen.serve.metrics`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raggen.errors import ConfigError, IndexIntegrityError, RaggenError
from raggen.index import ShardedIndex, load_version, read_latest
from raggen.serve.schemas import IndexInfo

# a child of Serve's logger, so swaps and refusals land in the replica's log file next to Serve's own
log = logging.getLogger("ray.serve").getChild(__name__)


class NoIndexError(RaggenError):
    """The retriever has no verified index to serve from (yet)."""


# ---------------------------------------------------------------------------------- live index


@dataclass(frozen=True)
class LiveIndex:
    """One verified, loaded index version; replaced as a whole, never mutated."""

    root: str
    version: str
    index: Any  # raggen.index.ShardedIndex
    num_passages: int
    loaded_at: float


def load_live_index(root: str, version: str | None, *, s3: dict | None = None,
                    expect_dim: int | None = None) -> LiveIndex:
    """Load ``version`` (None: the one LATEST names) of the index at ``root``, every checksum verified.

    Raises IndexIntegrityError on a partial/corrupt version or one whose vectors the query encoder
    cannot search (dimension mismatch).
    """
    loaded = load_version(root, version, s3_options=s3)
    manifest = loaded.manifest
    dim = int(manifest.encoder.dim)
    if expect_dim is not None and dim != expect_dim:
        raise IndexIntegrityError(
            f"{root} version {manifest.version}: index vectors are {dim}-d but the query encoder gives {expect_dim}-d")
    index = ShardedIndex.from_version(loaded, use_actors=False)
    return LiveIndex(root=root, version=str(manifest.version), index=index,
                     num_passages=int(manifest.num_passages), loaded_at=time.time())


def read_latest_version(root: str, *, s3: dict | None = None) -> str | None:
    """The version name the ``LATEST`` pointer next to the versions holds (None: no pointer)."""
    return read_latest(root, s3_options=s3)


class IndexHolder:
    """Holds the live index; swaps in a verified new version atomically, refuses a bad one.

    A swap loads the new version while the old one keeps serving (readers take ``holder.live``
    once per batch), then replaces the reference. A refused version (IndexIntegrityError, or any
    load error) is logged and recorded in ``last_error``; the old version keeps serving. A replica
    that has no old version yet (one started later by the autoscaler, while the user_config still
    names the refused version) falls back to the version ``LATEST`` names, so the deployment can
    still scale; with no verifiable ``LATEST`` either the error propagates (the replica fails).

    ``on_swap(old, new)`` runs after every version change (``old`` None for the first load) and
    ``on_refuse(message)`` after every refusal: the replica's metrics (hooks must not raise).
    """

    def __init__(self, loader: Callable[[str, str | None], LiveIndex], latest_reader: Callable[[str], str | None],
                 on_swap: Callable[[LiveIndex | None, LiveIndex], None] | None = None,
                 on_refuse: Callable[[str], None] | None = None):
        self._loader = loader
        self._latest_reader = latest_reader
        self._on_swap = on_swap
        self._on_refuse = on_refuse
        self._live: LiveIndex | None = None
        self._swap_lock = threading.Lock()
        self._refused: set[tuple[str, str]] = set()
        self._watch_stop: threading.Event | None = None
        self.requested: str | None = None
        self.last_error: str | None = None

    @property
    def live(self) -> LiveIndex:
        live = self._live
        if live is None:
            raise NoIndexError(f"no verified index loaded (last error: {self.last_error})")
        return live

    def swap_to(self, root: str, version: str | None, cancel: threading.Event | None = None) -> bool:
        """Load ``root``@``version`` beside the live index and swap; False (and last_error) if refused.

        ``cancel`` (a stopped watcher's event) drops a swap that waited for the lock while a newer
        ``configure`` ran, so a retired watcher never overrides the current user_config.
        """
        with self._swap_lock:
            if cancel is not None and cancel.is_set():
                return False
            self.requested = f"{root}@{version or 'LATEST'}"
            current = self._live
            if current is not None and version is not None and (current.root, current.version) == (root, version):
                return True
            try:
                new = self._loader(root, version)
            except Exception as exc:  # noqa: BLE001 - any failure to load must leave the old index serving
                self.last_error = f"refused {root} version {version or 'LATEST'}: {type(exc).__name__}: {exc}"
                self._notify(self._on_refuse, self.last_error)
                if current is None:
                    raise
                log.error("index swap %s", self.last_error)
                return False
            self._live = new
            self.last_error = None
            log.info("index swap: now serving %s version %s (%d passages)", root, new.version, new.num_passages)
            self._notify(self._on_swap, current, new)
            return True

    @staticmethod
    def _notify(hook: Callable[..., None] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - a metrics hook must never change what is served
            log.exception("index holder hook failed")

    def configure(self, index: str, version: str | None = None, watch_latest: bool = False,
                  watch_interval_s: float = 10.0) -> bool:
        """Apply a ``user_config``: load the named version (or LATEST), then (re)start the watcher."""
        self.stop_watching()
        ok = False
        try:
            if version is None:  # resolve LATEST now, so an unchanged pointer is a no-op
                version = self._latest_reader(index)
        except Exception as exc:  # noqa: BLE001 - an unreachable store is a refusal, not a crash
            self.refuse(f"refused {index} LATEST: cannot read it: {type(exc).__name__}: {exc}")
        else:
            try:
                ok = self.swap_to(index, version)
            except Exception:  # noqa: BLE001 - nothing live yet: try LATEST before failing the replica
                if version is None or not self._fall_back_to_latest(index, version):
                    raise
                ok = False
            if not ok and version is not None:
                self._refused.add((index, version))  # the watcher must not retry it every tick
        if watch_latest:
            self._start_watching(index, watch_interval_s)
        return ok

    def _fall_back_to_latest(self, index: str, refused: str) -> bool:
        """After ``refused`` failed with nothing live: serve LATEST if it is another, verifiable version."""
        reason = self.last_error
        try:
            latest = self._latest_reader(index)
            if latest is None or latest == refused or not self.swap_to(index, latest):
                return False
        except Exception as exc:  # noqa: BLE001 - the caller re-raises the original refusal
            log.error("index fallback to LATEST failed: %s", exc)
            self.last_error = reason
            return False
        self.last_error = f"{reason}; serving LATEST ({latest}) instead"
        log.error("index %s", self.last_error)
        return True

    def poll_latest(self, root: str, cancel: threading.Event | None = None) -> bool:
        """One watcher tick: swap to the version LATEST names if it is new and not refused before."""
        latest = self._latest_reader(root)
        if latest is None:
            return False
        current = self._live
        if current is not None and (current.root, current.version) == (root, latest):
            return False
        if (root, latest) in self._refused:
            return False
        ok = self.swap_to(root, latest, cancel)
        if not ok and not (cancel is not None and cancel.is_set()):
            self._refused.add((root, latest))
        return ok

    def _start_watching(self, root: str, interval_s: float) -> None:
        stop = threading.Event()
        self._watch_stop = stop

        def watch() -> None:
            while not stop.wait(interval_s):
                try:
                    self.poll_latest(root, stop)
                except Exception as exc:  # noqa: BLE001 - a flaky store must not kill the watcher
                    log.warning("index watcher: cannot follow %s/LATEST: %s", root, exc)

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
        return IndexInfo(version=live.version, index=live.root, num_passages=live.num_passages,
                         loaded_at=live.loaded_at, requested=self.requested, last_error=self.last_error).model_dump()


class IndexUserConfig(BaseModel):
    """The Retriever's ``user_config``: which index to serve; changing it hot-swaps the index."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(min_length=1, description="root folder or s3:// prefix holding versions and LATEST")
    version: str | None = Field(None, description="a version name; None follows LATEST")
    watch_latest: bool = False
    watch_interval_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> "IndexUserConfig":
        if self.watch_latest and self.version is not None:
            raise ValueError("version pins one version while watch_latest follows LATEST: set only one")
        return self


def load_for_swap(root: str, version: str | None, *, s3: dict | None, expect_dim: int) -> LiveIndex:
    """:func:`load_live_index` with keyword-only settings, for ``functools.partial`` in a replica."""
    return load_live_index(root, version, s3=s3, expect_dim=expect_dim)
