"""Shared integration fixtures: a real S3 API (moto in server mode on loopback) and a local Ray.

Nothing is patched: boto3 and pyarrow talk HTTP to the moto server at 127.0.0.1:<free port>.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

import pytest

#: the credentials every moto server accepts (``moto_s3``'s); the shared cluster's workers start with
#: them in their environment, as a real cluster's nodes have theirs (encoder actors and Train workers
#: read S3 themselves)
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def moto_s3():
    """A moto S3 server on 127.0.0.1 for this module; yields the s3_options that reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "region_name": "us-east-1",
        "aws_access_key_id": MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "max_attempts": 2,
    }
    try:
        yield options
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(moto_s3):
    """A fresh, empty bucket on the moto server: (bucket name, s3_options)."""
    from raggen.storage import s3_client

    name = f"raggen-{uuid.uuid4().hex[:12]}"
    s3_client(moto_s3).create_bucket(Bucket=name)
    return name, moto_s3


#: how long a module's teardown waits for its tasks, actors and placement groups to give back the CPUs
RELEASE_TIMEOUT_S = 20.0
_shared: dict[str, str | None] = {"gcs": None}


@contextmanager
def _moto_credentials_in_environment():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in MOTO_CREDENTIALS.items():
            mp.setenv(key, value)
        yield


def shared_ray():
    """This test process's local Ray (2 CPUs, the dashboard on a free port), started on first use and
    kept for the next module: a cluster start costs ~8 CPU-seconds and Ray's per-cluster actors (Ray
    Data's stats and autoscaling actors, ...) more, on a 2-core machine where the suite is CPU-bound.

    The dashboard is on because Ray Train's placement-group cleaner asks the State API whether its
    controller lives; a cluster without it advertises 127.0.0.1:8265, where another test's cluster may
    answer "no such actor" and have the run's placement group removed mid-training. A module that needs
    a cluster of its own (2 nodes, special metrics settings) calls ``ray.shutdown()`` first; the next
    module then starts a fresh shared one."""
    import ray

    from tests.helpers import free_port

    if ray.is_initialized():
        if ray.get_runtime_context().gcs_address == _shared["gcs"]:
            return ray
        ray.shutdown()
    with _moto_credentials_in_environment():  # the raylet, and every worker it starts, inherit them
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False, dashboard_port=free_port())
    _shared["gcs"] = ray.get_runtime_context().gcs_address
    return ray


def release_shared_ray() -> None:
    """A module's end: Serve down, then wait until every CPU is free again. A module that left
    something holding resources (a leaked actor or placement group) gets the cluster shut down, so
    the next module starts clean instead of starving."""
    import ray
    from ray import serve

    if not ray.is_initialized() or ray.get_runtime_context().gcs_address != _shared["gcs"]:
        return
    serve.shutdown()
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources().get("CPU", 0.0):
        if time.monotonic() > deadline:
            ray.shutdown()
            return
        time.sleep(0.25)


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_ends_with_the_session():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def no_shared_ray():
    """For a module that runs Ray in other processes only (``ray start`` + ``ray job submit``, a
    benchmark script): the shared cluster is stopped, so its idle processes do not take CPU from them."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    """The shared local 2-CPU Ray for this module (actors in tests ask for fractional CPUs)."""
    yield shared_ray()
    release_shared_ray()


@pytest.fixture(scope="module")
def ray_with_credentials(moto_s3, ray_cluster):
    """The shared Ray (its workers hold the moto credentials) and the same credentials in this
    process's environment for the module (the driver's own S3 calls without explicit keys)."""
    with _moto_credentials_in_environment():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """A failed test that used a started cluster (a fixture value with ``log_tails()``, e.g.
    test_job_submit's) gets the cluster's log ends in its report: they are deleted at teardown."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        tails = getattr(value, "log_tails", None)
        if callable(tails):
            try:
                report.sections.append((f"logs of fixture {name!r}", tails()))
            except Exception as exc:  # the report must not fail on its extra section
                report.sections.append((f"logs of fixture {name!r}", f"unreadable: {exc!r}"))
