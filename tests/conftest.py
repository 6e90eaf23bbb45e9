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


#: the slowest test files, slowest first (seconds of one fresh-clone ``make test`` run, 2 cores). Under
#: ``make test`` (``--dist loadfile --no-loadscope-reorder``) a pytest process takes the next whole file
#: when it runs short of tests, in collection order: the long files start first and the short ones
#: fill the end, instead of one process finishing a 4-minute file while the other idles.
SLOWEST_FILES_FIRST = (
    "tests/integration/test_train_ray.py",  # 273 s
    "tests/integration/test_dry_run_configs.py",  # 233 s
    "tests/integration/test_job_submit.py",  # 204 s
    "tests/integration/test_faults.py",  # 162 s
    "tests/integration/test_serve_http.py",  # 121 s
    "tests/integration/test_index_ray_s3.py",  # 90 s
    "tests/integration/test_index_actors.py",  # 79 s
    "tests/integration/test_refresh_job.py",  # 78 s
    "tests/integration/test_serve_openai.py",  # 52 s
    "tests/integration/test_serve_actors.py",  # 44 s
    "tests/integration/test_serve_swap_and_modes.py",  # 43 s
    "tests/integration/test_gpu_check.py",  # 38 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of :data:`SLOWEST_FILES_FIRST` first, in its order; every other file after them in
    collection order (a stable sort: tests within a file keep theirs)."""
    rank = {path: i for i, path in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(scope="module")
def one_faiss_thread():
    """FAISS on one OpenMP thread for a module (deterministic timings of its searches)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
