"""Per-step training metrics as JSONL (written by rank 0) and a PNG plot of a run (``report.py`` draws it).

One JSON object per line: ``{"step": 12, "loss": ..., "acceptance_rate": ..., "grad_norm": ...,
"examples_per_s": ..., "lr": ..., "time": ...}``; events that are not steps (a restore, an eval)
carry an ``"event"`` key. A run that restarts after a failure appends again from its last
checkpoint, so a step may occur twice: readers keep the last line of each step.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
    worker can run the same code. ``sinks`` (``raggen.train.sinks``: TensorBoard, MLflow) receive
    each record as written, so every destination sees the same numbers.
    """

    def __init__(
        self, path: str | os.PathLike | None, enabled: bool = True, fresh: bool = False, sinks: Sequence[Any] = ()
    ):
        """``fresh=True`` truncates: a run with no checkpoint to resume has no history to keep
        (a stale file from an older run of the same name, or steps a restart will redo)."""
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        self.sinks = list(sinks) if enabled else []
        self._fh = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w" if fresh else "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        plain = {k: _plain(v) for k, v in record.items()}
        if self.enabled:
            self._fh.write(json.dumps(plain, sort_keys=True) + "\n")
            self._fh.flush()
        self._each_sink("write", plain)

    def flush(self) -> None:
        """Push the sinks' buffers to disk (before the run folder is uploaded)."""
        self._each_sink("flush")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._each_sink("close")
        self.sinks = []

    def _each_sink(self, method: str, *args: Any) -> None:
        """A failing sink is dropped with a warning: a tracking-server outage must not end a training
        run, and metrics.jsonl keeps every record anyway."""
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # noqa: BLE001 - whatever the sink's library raises
                log.warning(
                    "metrics sink %s failed in %s (%s: %s); it gets no more records",
                    type(sink).__name__,
                    method,
                    type(exc).__name__,
                    exc,
                )
                self.sinks.remove(sink)

    def __enter__(self) -> MetricsWriter:
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


def series(steps: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping steps where it is missing or not finite."""
    xs, ys = [], []
    for record in steps:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(record["step"])
            ys.append(float(value))
    return xs, ys


def plot_metrics(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None, smooth: float = 0.9) -> str:
    """One run's report (``raggen.train.report.plot_runs``); the PNG goes next to its
    ``metrics.jsonl`` unless ``out_png`` says otherwise. Returns the PNG path."""
    from raggen.train.report import metrics_file, plot_runs

    if out_png is None:
        out_png = metrics_file(run_dir).parent / "metrics.png"
    return plot_runs([run_dir], out_png, smooth=smooth)
