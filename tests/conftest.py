"""Fixtures and settings every test module shares (integration-only fixtures: tests/integration/conftest.py)."""

from __future__ import annotations

import os

import pytest

#: Ray settings for every cluster a test starts (in this process or by ``ray start``/a job, which
#: inherit the environment): no usage-stats reporting thread, and no Ray Train preemption-watcher
#: actor per run (a process that polls node drain state every 5 s; these runs are never preempted).
#: The suite is CPU-bound on 2 cores, so background work of idle Ray processes costs test time.
TEST_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs tests on two processes) each process gets one torch and
    one FAISS thread (two processes x all cores would oversubscribe the machine) and its own Ray
    temp dir: a Ray cluster's processes find "their" cluster through ``<RAY_TMPDIR>/ray``'s
    ``ray_current_cluster``, and with one shared folder a Ray Train controller check in one process's
    cluster would look up the other's (and, not finding its controller there, end the run)."""
    for key, value in TEST_RAY_ENV.items():
        os.environ.setdefault(key, value)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        os.environ["RAY_TMPDIR"] = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), f"raggen-{worker}")
        os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
        import faiss
        import torch

        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """FAISS on one OpenMP thread for a module (deterministic timings of its searches)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
