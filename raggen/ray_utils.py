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
