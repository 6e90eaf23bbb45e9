"""``raggen report``: one PNG comparing runs from their ``metrics.jsonl``.

Each panel shares the step axis: training curves smoothed by a debiased EMA (TensorBoard's
smoothing, so the first point is not dragged towards 0) drawn over the faint raw values, and the
``"event": "eval"`` records as markers joined by lines. One colour per run; the figure legend
names the runs, a panel's own legend the eval metrics it holds. A run is a folder or ``s3://``
prefix holding ``metrics.jsonl``, or the file itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raggen.errors import DataError
from raggen.train.metrics import METRICS_FILE, read_metrics, series

DEFAULT_SMOOTH = 0.9
TRAIN_PANELS = (
    ("loss", "loss"),
    ("acceptance_rate", "acceptance rate"),
    ("grad_norm", "grad norm"),
    ("examples_per_s", "examples / s"),
    ("lr", "learning rate"),
)
UNSMOOTHED = {"lr"}  # a schedule, not a noisy measurement
EVAL_PANELS = (("eval answers", ("eval_em", "eval_f1")), ("eval retrieval", ("recall",)))


def ema(values: Sequence[float], smooth: float) -> list[float]:
    """Debiased exponential moving average: ``s_t = smooth * s_{t-1} + (1 - smooth) * x_t`` from
    ``s_0 = 0``, divided by ``1 - smooth**t`` (the weights' sum), so each point is a weighted mean of
    the values so far. ``smooth`` in [0, 1); 0 returns the values."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth: expected a value in [0, 1), got {smooth}")
    out, last, weight = [], 0.0, 0.0
    for x in values:
        last = smooth * last + (1.0 - smooth) * x
        weight = smooth * weight + (1.0 - smooth)
        out.append(last / weight)
    return out


@dataclass
class RunCurves:
    name: str
    steps: list[dict[str, Any]]  # one record per step (the last written)
    evals: list[dict[str, Any]]  # eval events, the last per step, by step


def metrics_file(run: str | os.PathLike) -> Path:
    """A local run's ``metrics.jsonl`` (the argument itself when it is a file)."""
    path = Path(run)
    return path if path.is_file() or path.suffix == ".jsonl" else path / METRICS_FILE


def run_names(runs: Sequence[str]) -> list[str]:
    """Short legend names: the run folder's name, with its parent where two runs share one."""
    parts = [[p for p in str(r).replace("s3://", "").rstrip("/").split("/") if p] for r in runs]
    parts = [p[:-1] if p and p[-1].endswith(".jsonl") else p for p in parts]
    names = [p[-1] if p else str(r) for p, r in zip(parts, runs)]
    if len(set(names)) < len(names):
        names = ["/".join(p[-2:]) for p in parts]
    return names


def load_run(run: str | os.PathLike, name: str, s3_options: dict[str, Any] | None = None) -> RunCurves:
    """Read one run's metrics; an ``s3://`` run is read with ``s3_options`` (else the AWS environment)."""
    run = str(run)
    if run.startswith("s3://"):
        from raggen.storage import read_bytes

        uri = run if run.endswith(".jsonl") else f"{run.rstrip('/')}/{METRICS_FILE}"
        try:
            data = read_bytes(uri, s3_options)
        except FileNotFoundError:
            raise DataError(f"{uri}: no metrics file (expected {METRICS_FILE} written by a training run)") from None
        with tempfile.TemporaryDirectory(prefix="raggen-report-") as tmp:
            local = Path(tmp, METRICS_FILE)
            local.write_bytes(data)
            steps, events = read_metrics(local)
    else:
        steps, events = read_metrics(metrics_file(run))
    evals = {int(e["step"]): e for e in events if e.get("event") == "eval" and "step" in e}
    return RunCurves(name, steps, [evals[s] for s in sorted(evals)])


def eval_groups(runs: Sequence[RunCurves]) -> list[tuple[str, list[str]]]:
    """(panel title, eval keys) for the eval metrics some run recorded, answers then retrieval."""
    keys = sorted(
        {
            k
            for r in runs
            for e in r.evals
            for k, v in e.items()
            if k.startswith("eval_") and k != "eval_num_examples" and isinstance(v, (int, float))
        }
    )
    groups = []
    for title, patterns in EVAL_PANELS:
        picked = [k for k in keys if any(p == k or (not p.startswith("eval_") and p in k) for p in patterns)]
        if picked:
            groups.append((title, picked))
    return groups


def plot_runs(
    runs: Sequence[str | os.PathLike],
    out_png: str | os.PathLike,
    smooth: float = DEFAULT_SMOOTH,
    s3_options: dict[str, Any] | None = None,
) -> str:
    """Draw the runs' curves into ``out_png`` (written to a temp name, then moved); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not runs:
        raise DataError("report: no runs given")
    ema([], smooth)  # a bad smoothing factor fails before any file is read
    curves = [load_run(r, n, s3_options) for r, n in zip(runs, run_names([str(r) for r in runs]))]
    train = [(key, label) for key, label in TRAIN_PANELS if any(series(c.steps, key)[0] for c in curves)]
    groups = eval_groups(curves)
    n = len(train) + len(groups)
    if not n:
        raise DataError(f"{', '.join(str(r) for r in runs)}: no step metrics to plot")
    ncols = 1 if n <= 3 else 2
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 2.4 * nrows + 0.8), sharex=True, squeeze=False)
    flat = list(axes.flat)
    colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(curves))]
    for ax, (key, label) in zip(flat, train):
        for run, colour in zip(curves, colours):
            xs, ys = series(run.steps, key)
            if not xs:
                continue
            if smooth and key not in UNSMOOTHED:
                ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(xs, ema(ys, smooth), color=colour, linewidth=1.6)
            else:
                ax.plot(xs, ys, color=colour, linewidth=1.4)
        ax.set_ylabel(label, fontsize=9)
    markers, styles = "osD^v<>", ("-", "--", ":", "-.")
    for ax, (title, keys) in zip(flat[len(train) :], groups):
        for i, key in enumerate(keys):
            for run, colour in zip(curves, colours):
                xs, ys = series(run.evals, key)
                ax.plot(
                    xs,
                    ys,
                    color=colour,
                    marker=markers[i % len(markers)],
                    linestyle=styles[i % len(styles)],
                    markersize=4,
                    linewidth=1.2,
                )
        proxies = [
            Line2D([], [], color="0.3", marker=markers[i % len(markers)], linestyle=styles[i % len(styles)])
            for i in range(len(keys))
        ]
        ax.legend(proxies, [k[len("eval_") :] for k in keys], fontsize=7, loc="best")
        ax.set_ylabel(title, fontsize=9)
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax in flat[:n]:
        ax.grid(alpha=0.3)
    for ax in flat[max(0, n - ncols) : n]:
        ax.set_xlabel("step")
        ax.xaxis.set_tick_params(labelbottom=True)
    handles = [Line2D([], [], color=c, linewidth=2) for c in colours]
    fig.legend(
        handles, [c.name for c in curves], loc="upper center", ncol=min(len(curves), 4), fontsize=9, frameon=False
    )
    note = f"EMA smoothing {smooth:g} (raw values faint)" if smooth else "raw values"
    fig.suptitle(note, y=0.005, va="bottom", fontsize=8, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.45 / (2.4 * nrows + 0.8)))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return str(out)
