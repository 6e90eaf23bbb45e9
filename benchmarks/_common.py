"""Helpers the benchmark scripts share: the machine line every table starts with, and the table."""

from __future__ import annotations

import os
import platform

import numpy as np


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming what the numbers were measured on: GPU (or none), CPU, library versions."""
    import faiss
    import ray
    import torch

    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    else:
        gpu = "no GPU"
    cuda = torch.version.cuda or "none (CPU wheel)"
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return (
        f"{gpu}; {cpu_model()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}; "
        f"torch {torch.__version__}, CUDA {cuda}, faiss {faiss.__version__} ({faiss_gpus} GPUs), "
        f"ray {ray.__version__}, python {platform.python_version()}"
    )


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table, columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def make_vectors(n: int, d: int, seed: int, clusters: int = 1000, random_fraction: float = 0.2) -> np.ndarray:
    """(n, d) unit vectors from a fixed seeded mixture: 80% around ``clusters`` centres (noise 0.6 of a
    centre's norm), 20% uniform. The centres come from a fixed seed; ``seed`` draws the points, so
    queries drawn with another seed are held-out draws of the same mixture (recall means something)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, d), dtype=np.float32)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = rng.standard_normal((m, d), dtype=np.float32)
        clustered = rng.random(m) >= random_fraction
        labels = rng.integers(0, clusters, int(clustered.sum()))
        x[clustered] = centres[labels] + 0.6 * x[clustered]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out
