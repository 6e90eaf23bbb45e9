"""Helpers the benchmark scripts share: the machine line every table starts with, and the table."""

from __future__ import annotations

import os
import platform


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
