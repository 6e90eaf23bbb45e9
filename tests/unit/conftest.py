"""Unit tests run without a Ray instance of this pytest process: under ``make test`` the integration
files run first (tests/conftest.py), and the shared Ray they leave up would change what a unit
test sees (a version that would open shard actors, or refuse to without Ray)."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_by_integration_tests():
    ray = sys.modules.get("ray")  # never imported here: a unit module that needs Ray starts its own
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    yield
