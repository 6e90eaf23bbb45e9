"""Shared integration fixtures: a real S3 API (moto in server mode on loopback) and a local Ray.

Nothing is patched: boto3 and pyarrow talk HTTP to the moto server at 127.0.0.1:<free port>.
"""

from __future__ import annotations

import os
import uuid

import pytest


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
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
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


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for this module (actors in tests ask for fractional CPUs)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_with_credentials(moto_s3):
    """A local Ray whose workers inherit the moto S3 credentials (as cluster nodes have theirs: encoder
    actors and Train workers read S3 themselves)."""
    import ray

    keys = {
        "AWS_ACCESS_KEY_ID": moto_s3["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": moto_s3["aws_secret_access_key"],
    }
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
