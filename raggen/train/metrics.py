"""Per-step training metrics as JSONL (written by rank 0) and a PNG plot of a run.

One JSON object per line: ``{"step": 12, "loss": ..., "acceptance_rate": ..., "grad_norm": ...,
"examples_per_s": ..., "lr": ..., "time": ...}``; events that are not steps (a restore, an eval)
carry an ``"event"`` key. A run that restarts after a failure appends again from its last
checkpoint, so a step may occur twice: readers keep the last line of each step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

METRICS_FILE = "metrics.jsonl"
STEP_KEYS = ("loss", "acceptance_rate", "grad_norm", "examples_per_s", "lr")


def _plain(value: Any) -> Any:
    """JSON-safe scalars: tensors/numpy to float, NaN/inf to None (JSON has neither)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON line per call and flushes, so a crash loses at most the line in flight.

    Only rank 0 should hold one (``enabled=False`` elsewhere makes ``write`` a no-op), so every
    worker can run the same code.
    """

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True, fresh: bool = False):
        """``fresh=True`` truncates: a run with no checkpoint to resume has no history to keep
        (a stale file from an older run of the same name, or steps a restart will redo)."""
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        self._fh = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w" if fresh else "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _plain(v) for k, v in record.items()}, sort_keys=True)
        self._fh.write(line + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(steps sorted by step with the last line of each step kept, events in file order).

    A torn last line (the writer died mid-write) is skipped; any other bad line is an error.
    """
    from raggen.errors import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no metrics file (expected {METRICS_FILE} written by a training run)")
    lines = path.read_text(encoding="utf-8").splitlines()
    by_step: dict[int, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    for row, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if row == len(lines):
                continue
            raise DataError(f"{path}: row {row}: not a JSON object") from None
        if "event" in record:
            events.append(record)
        elif "step" in record:
            by_step[int(record["step"])] = record
        else:
            raise DataError(f"{path}: row {row}: neither a step nor an event")
    return [by_step[s] for s in sorted(by_step)], events


def _series(steps: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in steps:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(record["step"])
            ys.append(float(value))
    return xs, ys


def plot_metrics(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None) -> str:
    """Plot loss, acceptance rate, grad norm, throughput and lr against step; returns the PNG path.

    ``run_dir`` is a run folder holding ``metrics.jsonl`` (or the file itself); the PNG goes next
    to it unless ``out_png`` says otherwise. Written to a temp name then moved into place.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_path = run_dir if run_dir.is_file() else run_dir / METRICS_FILE
    steps, events = read_metrics(metrics_path)
    keys = [k for k in STEP_KEYS if _series(steps, k)[0]]
    evals = sorted({k for e in events if e.get("event") == "eval" for k in e if k.startswith("eval_")})
    panels = keys + (["eval"] if evals else [])
    if not panels:
        from raggen.errors import DataError

        raise DataError(f"{metrics_path}: no step metrics to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], panels):
        if key == "eval":
            for name in evals:
                pts = [(e["step"], e[name]) for e in events if e.get("event") == "eval" and e.get(name) is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.legend(fontsize=7)
            ax.set_ylabel("eval")
        else:
            xs, ys = _series(steps, key)
            ax.plot(xs, ys, linewidth=1)
            ax.set_ylabel(key.replace("_", " "), fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(metrics_path.parent.name))
    fig.tight_layout()
    out = Path(out_png) if out_png else metrics_path.parent / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return str(out)
