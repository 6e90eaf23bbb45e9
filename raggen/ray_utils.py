"""Ray start-up for entry points only (CLI, jobs, tests): library modules never call ``ray.init``."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Connect to the cluster named by ``address``/RAY_ADDRESS (as under ``ray job submit``), else start
    a local Ray. Idempotent, so a CLI command that calls several library functions starts Ray once."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    log.info("ray: %s", ray.cluster_resources())


def running_cluster_address() -> str | None:
    """The cluster a plain ``ray.init()`` joins: RAY_ADDRESS, else the one ``ray start`` left on this
    machine (its address file in Ray's temp dir, RAY_TMPDIR or /tmp/ray); None where ``ray.init()``
    would start a new Ray instance of its own. Ray's own lookup (a private function of the pinned Ray;
    tests/unit/test_ray_utils.py fails if it moves)."""
    from ray._private.services import get_ray_address_from_environment

    return get_ray_address_from_environment(None, None)


def join_running_cluster(purpose: str, *, log_to_driver: bool = True) -> None:
    """Connect to the running cluster (:func:`running_cluster_address`) and never start one: what
    ``purpose`` leaves on it (a detached Serve app) must outlive this process, and a Ray instance
    this process started would end with it. Idempotent, as :func:`ensure_ray`."""
    import ray

    from raggen.errors import RaggenError

    if ray.is_initialized():
        return
    address = running_cluster_address()
    if address is None:
        raise RaggenError(
            f"{purpose}: no running Ray cluster to leave it on; start one with `ray start --head` "
            "(`ray stop` ends it) or set RAY_ADDRESS to a cluster's address (a Ray instance that raggen "
            "started itself would stop when this command exits)"
        )
    ray.init(address=address, log_to_driver=log_to_driver)
    log.info("ray: %s", ray.cluster_resources())
