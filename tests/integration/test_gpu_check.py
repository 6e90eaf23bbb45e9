"""benchmarks/gpu_check.py --tiny run as a user runs it: a machine line and one table whose rows
all carry numbers; rows that need a GPU say so when there is none."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    "(a) encode: Ray Data pipeline, steady", "(a) encode: Ray Data pipeline, stage 2", "(a) encode: plain loop, 1 process",
    "(a) encode: pipeline / plain", "(a) encode: model only, bucketed", "(b) faiss IVF-PQ build (train + add)",
    "(b) faiss IVF-PQ search, GPU", "(b) faiss IVF-PQ search, CPU", "(b) faiss search GPU / CPU",
    "(b) faiss recall@10 vs exact, GPU", "(b) faiss recall@10 vs exact, CPU", "(b) faiss IVF-PQ,Refine(SQfp16) build",
    "(b) faiss IVF-PQ,Refine(SQfp16) search, CPU", "(b) faiss recall@10 vs exact, Refine(SQfp16)",
    "(c) JSA Ray Train step", "total wall time",
]  # fmt: skip
GPU_ROWS = {"(b) faiss IVF-PQ search, GPU", "(b) faiss search GPU / CPU", "(b) faiss recall@10 vs exact, GPU"}


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _table(stdout: str) -> dict[str, str]:
    """{check: value} of the printed markdown table (header and rule skipped)."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, stdout
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0][:3] == ["check", "value", "unit"]
    return {c[0]: c[1] for c in cells[2:]}


@pytest.mark.timeout(420)
def test_tiny_gpu_check_prints_one_complete_table(ray_cluster):
    """On this process's shared Ray (``--address``): a cluster of its own would cost two cluster
    start-ups (its own, then the shared one again for the next module) on a CPU-bound suite."""
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--address", address],
                          cwd=REPO, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("machine: ") and all(w in first for w in ("torch", "CUDA", "faiss", "cores")), first
    assert sum(line.startswith("| check ") for line in proc.stdout.splitlines()) == 1, "exactly one table"
    table = _table(proc.stdout)
    assert list(table) == ROWS
    no_gpu = _faiss_gpus() == 0
    for check, value in table.items():
        if check in GPU_ROWS and no_gpu:
            assert value == "n/a (no GPU)", (check, value)
            continue
        number = float(value.replace(",", ""))
        assert math.isfinite(number) and number > 0, (check, value)
    assert 0.0 < float(table["(b) faiss recall@10 vs exact, CPU"]) <= 1.0
    # re-ranking the PQ candidates with fp16 vectors finds at least what the PQ codes alone find
    assert float(table["(b) faiss recall@10 vs exact, Refine(SQfp16)"]) >= float(
        table["(b) faiss recall@10 vs exact, CPU"]
    )
