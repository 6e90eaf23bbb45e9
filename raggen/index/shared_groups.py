"""Shared groups (many independent callers of one version, e.g. the replicas of a Serve Retriever):
``open_shared_group`` borrows the version's group from the cluster's ``ShardGroupRegistry``, a
detached actor (get-if-exists by name) that starts the group on the first request (verified, as
``start``), lends the same group to every later caller with the same version folder and actor
settings (``group_key``), and ends it when the last borrower has given its lease back (a closed
ShardedIndex gives it back; leases of dead actors are dropped). The registry owns the groups it
started, so no borrower's death takes a group down under the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Mapping
from typing import Any

from raggen.index.actors import ShardActorGroup, _get
from raggen.index.loading import read_manifest, resolve_version_uri
from raggen.index.manifest import Manifest
from raggen.index.settings import SearchSettings
from raggen.index.sharded import ShardedIndex

logger = logging.getLogger(__name__)

REGISTRY_NAME = "raggen-shard-groups"  # the detached actor that lends shared groups
REGISTRY_NAMESPACE = "raggen"


def group_key(version_uri: str, settings: SearchSettings, load_embeddings: bool | str) -> str:
    """What callers that may share one group must agree on: the version folder and every setting
    that shapes its actors (resources, shards per actor, search defaults, embeddings)."""
    shaping = settings.model_dump(include={"actor_num_cpus", "actor_num_gpus", "shards_per_actor", "actor_max_concurrency",
                                           "actor_max_restarts", "actor_search_retries",
                                           "nprobe", "ef_search", "refine_k_factor", "cache_versions"})  # fmt: skip
    return json.dumps({"uri": version_uri, "load_embeddings": load_embeddings, **shaping}, sort_keys=True)


class ShardGroupRegistry:
    """One detached Ray actor per cluster (``REGISTRY_NAME`` in ``REGISTRY_NAMESPACE``, created by
    its first caller with ``get_if_exists``) that starts, lends and ends shared shard groups.

    ``acquire(key, lease, holder, start_kwargs)`` returns the group of ``key`` (:func:`group_key`),
    starting it (``ShardActorGroup.start(**start_kwargs)``) on first use; concurrent first callers of
    one key wait for one start. The registry owns every group it started, so a group outlives the
    caller that asked first and ends only when ``release`` returns its last lease. Leases whose
    holder (an actor id, e.g. a Serve replica's) is dead are dropped at every call, so a replica
    that crashed does not keep a group alive forever; a group whose actors died is started again.
    """

    def __init__(self):
        self._lock = threading.Lock()  # guards the dicts; a key's own lock serialises its start / end
        self._key_locks: dict[str, threading.Lock] = {}
        self._groups: dict[str, ShardActorGroup] = {}
        self._leases: dict[str, dict[str, str | None]] = {}  # key -> {lease: holder actor id}

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def acquire(self, key: str, lease: str, holder: str | None, start_kwargs: dict[str, Any]) -> ShardActorGroup:
        self._prune()
        with self._key_lock(key):
            group = self._groups.get(key)
            if group is not None and not group.alive():
                logger.warning("shard actors %s: not all alive; starting the version again", group.name)
                self._end(key)
                group = None
            if group is None:
                group = ShardActorGroup.start(**start_kwargs)
            with self._lock:
                self._groups[key] = group
                self._leases.setdefault(key, {})[lease] = holder
        return group

    def release(self, lease: str) -> bool:
        """Return ``lease``; True when that ended its group (it was the last one)."""
        last = self._return(lease)
        self._prune()
        return last

    def _return(self, lease: str) -> bool:
        with self._lock:
            key = next((k for k, held in self._leases.items() if lease in held), None)
        if key is None:
            return False
        with self._key_lock(key):
            with self._lock:
                held = self._leases.get(key, {})
                held.pop(lease, None)
                last = not held
            if last:
                self._end(key)
        return last

    def _end(self, key: str) -> None:
        with self._lock:
            group = self._groups.pop(key, None)
            self._leases.pop(key, None)
        if group is not None:
            group.close()

    def _prune(self) -> None:
        with self._lock:
            held = [(lease, holder) for leases in self._leases.values() for lease, holder in leases.items() if holder]
        for lease, holder in held:
            if _actor_dead(holder):
                logger.warning("shard groups: holder %s is dead; returning its lease", holder)
                self._return(lease)

    def groups(self) -> dict[str, dict[str, Any]]:
        """{key: {"name", "version", "leases", "group"}} of the groups lent now."""
        with self._lock:
            return {k: {"name": g.name, "version": g.version, "leases": len(self._leases.get(k, {})), "group": g}
                    for k, g in self._groups.items()}  # fmt: skip


def _actor_dead(actor_id: str) -> bool:
    """Whether the GCS reports this actor DEAD (unknown: not dead)."""
    try:
        from ray._private import state

        info = state.actors(actor_id=actor_id)
    except Exception:  # noqa: BLE001 - a private API: when it fails, keep the lease
        return False
    return isinstance(info, dict) and str(info.get("State", "")).upper() == "DEAD"


#: the resource only the head node has (Ray's own name; Ray Serve places its controller with it)
HEAD_NODE_RESOURCE = "node:__internal_head__"


def shard_group_registry():
    """The cluster's :class:`ShardGroupRegistry` actor (created on first use: detached, 0 CPUs).

    It lives on the head node, whichever process asks first: the shard actors of the groups it
    starts are its own (they end with it, restarts or not), so it must not sit on a worker node
    that the cluster may lose (a Serve replica's, a Train worker's); the head's loss ends the
    cluster anyway."""
    import ray

    return ray.remote(ShardGroupRegistry).options(
        name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        resources={HEAD_NODE_RESOURCE: 0.001}, max_concurrency=64).remote()  # fmt: skip


def open_shared_group(
    uri: str,
    version: str | None = None,
    *,
    settings: SearchSettings,
    s3_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    manifest: Manifest | None = None,
    load_embeddings: bool | str = False,
    timeout_s: float = 600.0,
) -> ShardedIndex:
    """A ShardedIndex through the cluster's shared group of ``uri``@``version`` with these
    ``settings``: started (and verified) by the :class:`ShardGroupRegistry` on first use, lent to
    every later caller (e.g. each Serve replica of one version) instead of starting one per caller.
    ``close()`` returns this caller's lease; the group ends with the last lease. Raises
    IndexIntegrityError when the version does not verify (nothing is left running)."""
    import ray

    vuri = resolve_version_uri(uri, version, s3_options=s3_options)
    manifest = manifest if manifest is not None else read_manifest(vuri, s3_options=s3_options)
    holder = ray.get_runtime_context().get_actor_id()  # None on a driver: its lease is returned by close() only
    lease = f"{holder or 'driver'}:{secrets.token_hex(6)}"
    start_kwargs = {"uri": vuri, "settings": settings, "s3_options": dict(s3_options) if s3_options else None,
                    "cache_dir": None if cache_dir is None else str(cache_dir), "manifest": manifest,
                    "load_embeddings": load_embeddings, "timeout_s": timeout_s}  # fmt: skip
    registry = shard_group_registry()
    key = group_key(vuri, settings, load_embeddings)
    group = _get(ray, [registry.acquire.remote(key, lease, holder, start_kwargs)], timeout_s + 60.0, vuri)[0]

    def give_back() -> None:
        with contextlib.suppress(Exception):  # the cluster may be going away
            registry.release.remote(lease)

    return group.sharded_index(on_close=give_back)
