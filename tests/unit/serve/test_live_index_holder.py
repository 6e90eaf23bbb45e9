"""The HTTP contract without Ray: request validation (types + config bounds), auth, error bodies,
the index holder's swap/refuse rules, and the app args / Serve config builders."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.serve.deployments import IndexHolder, IndexUserConfig, LiveIndex, NoIndexError
from raggen.serve.schemas import RequestLimits

LIMITS = RequestLimits(max_question_chars=50, default_top_k=3, max_top_k=5, max_new_tokens=8)


# ---------------------------------------------------------------------------------- index holder


class Store:
    """Versions by name; a name in ``corrupt`` fails to load like a tampered upload does."""

    def __init__(self):
        self.latest = "v1"
        self.corrupt: set[str] = set()
        self.loads: list[str] = []

    def load(self, root: str, version: str | None) -> LiveIndex:
        version = version or self.latest
        self.loads.append(version)
        if version in self.corrupt:
            raise IndexIntegrityError(f"{root}/{version}/shard-00000.faiss: sha256 mismatch")
        return LiveIndex(root=root, version=version, index=object(), num_passages=10, loaded_at=0.0)


def test_holder_swaps_refuses_and_follows_latest():
    store = Store()
    holder = IndexHolder(store.load, lambda root: store.latest, retry_backoff_s=0.0)
    with pytest.raises(NoIndexError):
        _ = holder.live
    store.corrupt.add("v0")
    store.latest = "v0"
    with pytest.raises(IndexIntegrityError):  # nothing to fall back to: the replica must fail
        holder.configure("/idx", "v0")
    store.latest = "v1"
    # a replica started while the user_config pins a refused version serves LATEST instead
    assert not IndexHolder(store.load, lambda root: store.latest).configure("/idx", "v0")
    late = IndexHolder(store.load, lambda root: store.latest)
    late.configure("/idx", "v0")
    assert late.live.version == "v1" and "refused /idx version v0" in late.last_error
    assert "serving v1 instead" in late.last_error and late.info()["serving_fallback"]
    assert holder.configure("/idx") and holder.live.version == "v1"
    assert holder.swap_to("/idx", "v2") and holder.live.version == "v2"
    store.corrupt.add("v3")
    assert not holder.swap_to("/idx", "v3")
    assert holder.live.version == "v2" and "sha256 mismatch" in holder.info()["last_error"]
    store.latest = "v3"
    assert not holder.poll_latest("/idx")
    assert not holder.poll_latest("/idx")  # a refused version is not reloaded on every tick
    assert store.loads.count("v3") == 1  # an integrity error is refused for good at once
    info = holder.info()
    assert (info["version"], info["latest"], info["serving_fallback"]) == ("v2", "v3", True)
    store.latest = "v4"
    assert holder.poll_latest("/idx") and holder.live.version == "v4" and holder.info()["last_error"] is None
    assert not holder.info()["serving_fallback"]
    holder.refuse("invalid user_config")
    assert holder.live.version == "v4" and holder.info()["last_error"] == "invalid user_config"


def test_reopen_loads_the_live_version_again_once_and_keeps_it_when_the_load_fails():
    store = Store()
    holder = IndexHolder(store.load, lambda root: store.latest, retry_backoff_s=0.0)
    holder.configure("/idx")
    stale = holder.live
    assert holder.reopen(stale) and holder.live is not stale and holder.live.version == "v1"
    assert not holder.reopen(stale), "a batch that saw the same loss later finds the new one live"
    assert store.loads == ["v1", "v1"]
    fresh = holder.live
    store.corrupt.add("v1")
    with pytest.raises(IndexIntegrityError):
        holder.reopen(fresh)
    assert holder.live is fresh


def test_only_a_lost_actor_in_the_chain_counts_as_lost():
    from ray.exceptions import ActorDiedError, RayTaskError

    from raggen.serve.resilience import actor_lost

    assert actor_lost(ActorDiedError())
    assert actor_lost(RayTaskError("search_hits", "traceback", ActorDiedError()))
    assert not actor_lost(RuntimeError("faiss: k too large"))


class Flaky(Store):
    """A store whose loads of the names in ``down`` time out (a transient error, not a bad upload),
    with versions listed newest first (what ``versions_newest_first`` reads from manifests)."""

    def __init__(self, versions: list[str]):
        super().__init__()
        self.versions = versions
        self.down: set[str] = set()

    def load(self, root: str, version: str | None) -> LiveIndex:
        if (version or self.latest) in self.down:
            self.loads.append(version or self.latest)
            raise TimeoutError("connect timeout on endpoint URL")
        return super().load(root, version)

    def newest_first(self, root: str) -> list[str]:
        return list(reversed(self.versions))


def _holder(store: Flaky) -> IndexHolder:
    return IndexHolder(
        store.load,
        lambda root: store.latest,
        store.newest_first,
        retry_attempts=3,
        retry_backoff_s=0.0,
        max_backoff_s=0.0,
    )


def test_transient_errors_are_retried_and_never_refused():
    store = Flaky(["v1", "v2"])
    store.latest = "v2"
    store.down.add("v2")
    holder = _holder(store)
    # v2 times out 3 times at start: serve the newest older version, but do not refuse v2
    assert not holder.configure("/idx") and holder.live.version == "v1"
    assert store.loads.count("v2") == 3 and ("/idx", "v2") not in holder._refused
    assert "will retry" in holder.last_error and holder.info()["serving_fallback"]
    assert not holder.poll_latest("/idx")  # still down: retried on the next tick (backoff 0 here)
    store.down.clear()
    assert holder.poll_latest("/idx") and holder.live.version == "v2"  # the store is back: converged
    assert not holder.info()["serving_fallback"] and holder.last_error is None


def test_watcher_backs_off_after_a_transient_failure():
    store = Flaky(["v1", "v2"])
    holder = IndexHolder(store.load, lambda root: store.latest, store.newest_first, retry_backoff_s=60.0)
    assert holder.configure("/idx") and holder.live.version == "v1"
    store.latest, store.down = "v2", {"v2"}
    assert not holder.poll_latest("/idx") and store.loads.count("v2") == 1
    store.down.clear()
    assert not holder.poll_latest("/idx") and store.loads.count("v2") == 1  # waiting out the backoff
    holder._transient[("/idx", "v2")] = (1, 0.0)  # the backoff elapsed
    assert holder.poll_latest("/idx") and holder.live.version == "v2"


def test_replicas_that_cannot_verify_latest_converge_on_the_newest_good_version():
    store = Flaky(["v1", "v2", "v3", "v4"])  # v4 is newer than LATEST: never a fallback
    store.latest = "v2"
    first = _holder(store)
    assert first.configure("/idx", watch_latest=False) and first.live.version == "v2"
    store.corrupt.add("v3")
    store.latest = "v3"
    assert not first.poll_latest("/idx") and first.live.version == "v2"
    second = _holder(store)  # started later (the autoscaler): LATEST does not verify
    assert not second.configure("/idx") and second.live.version == "v2"
    for holder in (first, second):
        info = holder.info()
        assert (info["version"], info["latest"], info["serving_fallback"]) == ("v2", "v3", True)
        assert "v3" in info["last_error"] and "sha256" in info["last_error"]
    # a replica that was still on v1 when LATEST moved v1 -> v2 -> v3 (bad) moves up to v2 as well
    laggard = _holder(store)
    store.latest = "v1"
    assert laggard.configure("/idx") and laggard.live.version == "v1"
    store.latest = "v3"
    assert not laggard.poll_latest("/idx") and laggard.live.version == "v2"
    assert "v4" not in store.loads
    # nothing verifiable at all: the replica fails instead of serving nothing
    store.corrupt.update({"v1", "v2"})
    with pytest.raises(IndexIntegrityError):
        _holder(store).configure("/idx")


def test_holder_watcher_thread_cancel_and_unreadable_latest():
    store = Store()
    reachable = {"ok": True}

    def latest(root: str) -> str:
        if not reachable["ok"]:
            raise OSError("store unreachable")
        return store.latest

    holder = IndexHolder(store.load, latest)
    assert holder.configure("/idx", watch_latest=True, watch_interval_s=0.02)
    store.latest = "v2"
    deadline = time.monotonic() + 5
    while holder.live.version != "v2" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert holder.live.version == "v2"  # the watcher thread followed LATEST by itself
    holder.stop_watching()
    retired = threading.Event()
    retired.set()
    store.latest = "v3"
    assert not holder.poll_latest("/idx", retired) and holder.live.version == "v2"
    assert holder.poll_latest("/idx") and holder.live.version == "v3"  # a cancelled tick is not a refusal
    reachable["ok"] = False
    assert not holder.configure("/idx") and holder.live.version == "v3"
    assert "store unreachable" in holder.last_error
    with pytest.raises(ConfigError, match="store unreachable"):
        IndexHolder(store.load, latest).configure("/idx")  # nothing live to fall back to


def test_index_user_config_rules():
    assert IndexUserConfig(index="/i").model_dump() == {
        "index": "/i",
        "version": None,
        "watch_latest": False,
        "watch_interval_s": 10.0,
    }
    with pytest.raises(ValidationError, match="only one"):
        IndexUserConfig(index="/i", version="v1", watch_latest=True)
    with pytest.raises(ValidationError):
        IndexUserConfig(index="/i", bogus=1)
