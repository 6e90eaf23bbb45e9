"""Rank 0's progress line every ``log_every`` steps, through ``logging`` so it reaches ``ray job logs``:

    step 40/200 loss 3.21 acceptance 0.42 ex/s 12.3 lr 2.9e-05 eta 4m10s

Loss and the estimator's diagnostics are means over the steps since the last line (one step is
noise); ex/s and the ETA come from wall time, so checkpoints and evaluations count.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# (metric key, short name) of the diagnostics worth a place on the line; the JSONL has them all
DIAGNOSTICS = (
    ("acceptance_rate", "acceptance"),
    ("kl", "kl"),
    ("prior_entropy", "entropy"),
    ("mask_hardness", "hardness"),
)


def format_duration(seconds: float) -> str:
    """``4m10s``, ``1h02m``, ``35s``: short enough for a log line, coarse where precision is noise."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_progress(
    step: int, total: int, means: Mapping[str, float], examples_per_s: float, lr: float, eta_s: float
) -> str:
    """The progress line from already-averaged values (``means`` holds loss and diagnostics)."""
    parts = [f"step {step}/{total}", f"loss {means['loss']:.3g}"]
    parts += [f"{short} {means[key]:.3g}" for key, short in DIAGNOSTICS if key in means]
    parts += [f"ex/s {examples_per_s:.1f}", f"lr {lr:.1e}", f"eta {format_duration(eta_s)}"]
    return " ".join(parts)


class ProgressLog:
    """Accumulates step metrics and logs a line every ``every`` steps and at the last step (0: never)."""

    def __init__(
        self,
        total: int,
        every: int,
        examples_per_step: int,
        start_step: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total, self.every, self.examples_per_step = total, every, examples_per_step
        self.clock = clock
        self._t_start = self._t_window = clock()
        self._start_step = self._window_step = start_step
        self._sums: dict[str, float] = {}
        self._count = 0

    def update(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """Add the metrics of ``step`` (1-based, done); returns the line when one is due."""
        for key in ("loss", *(k for k, _ in DIAGNOSTICS)):
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        if not self.every or (step % self.every and step != self.total):
            return None
        now = self.clock()
        rate = (step - self._window_step) * self.examples_per_step / max(now - self._t_window, 1e-9)
        per_step = (now - self._t_start) / max(step - self._start_step, 1)
        means = {k: v / self._count for k, v in self._sums.items()}
        line = format_progress(
            step, self.total, means, rate, float(metrics.get("lr", 0.0)), per_step * (self.total - step)
        )
        self._sums, self._count, self._t_window, self._window_step = {}, 0, now, step
        log.info(line)
        return line


def ensure_log_handler(name: str = "raggen", level: int = logging.INFO) -> None:
    """Give ``name``'s logger a stderr handler when nothing would print INFO records (a Ray worker
    process has no handler, and logging's last resort shows warnings only)."""
    logger = logging.getLogger(name)
    if logger.handlers or logging.getLogger().handlers:
        if logger.getEffectiveLevel() > level:
            logger.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
