"""Ray start-up for entry points only (CLI, jobs, tests): library modules never call ``ray.init``."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

#: how long a cluster's GCS port may take to accept a connection before the cluster counts as gone
ANSWER_TIMEOUT_S = 5.0


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Connect to the cluster named by ``address``/RAY_ADDRESS (as under ``ray job submit``), else to
    the one ``ray start`` left on this machine (as a plain ``ray.init()`` does), else start a local Ray.
    A named cluster that does not answer is an error at once (:func:`check_cluster_answers`), not
    minutes of Ray's retries. Idempotent, so a CLI command that calls several library functions
    starts Ray once."""
    import ray

    if ray.is_initialized():
        return
    named = address or os.environ.get("RAY_ADDRESS")
    address = named or running_cluster_address()  # read once: what is checked is what is joined
    check_cluster_answers(address, explicit=named is not None)
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


def gcs_host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` (optionally ``ray://host:port``) -> (host, port); None for what is not one
    (``auto``, ``local``, other schemes): those are left to Ray."""
    rest = address.strip().removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or "://" in rest or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_cluster_answers(address: str | None, *, explicit: bool, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
    """Refuse a cluster address whose port accepts no connection. Without this check ``ray.init``
    retries a dead address for minutes (measured: over 5 minutes with Ray 2.60), which is what a
    stale address file does after a cluster died without ``ray stop``. ``explicit``: the address
    came from the caller or RAY_ADDRESS, not from that file."""
    from raggen.errors import RaggenError

    where = gcs_host_port(address) if address else None
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if explicit:
            fix = "check RAY_ADDRESS (or --address): it names no running cluster"
        else:
            fix = (
                "it is the address `ray start` left on this machine, of a cluster that is gone: "
                "`ray stop` clears it, `ray start --head` starts a new one"
            )
        raise RaggenError(f"the Ray cluster at {address} does not answer ({reason}); {fix}") from None


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
    check_cluster_answers(address, explicit=bool(os.environ.get("RAY_ADDRESS")))
    ray.init(address=address, log_to_driver=log_to_driver)
    log.info("ray: %s", ray.cluster_resources())
