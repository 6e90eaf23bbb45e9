"""Where rank 0's metric records go besides ``metrics.jsonl``, and how the run's local files reach storage.

``MetricsWriter`` hands every record (steps and events, as written to the JSONL) to each sink:
- ``TensorBoardSink``: scalars under ``train/`` and ``eval/`` through a ``SummaryWriter``
  (``torch.utils.tensorboard`` when the ``tensorboard`` package is installed, else ``tensorboardX``,
  which ``ray[train]`` already depends on; both write the same event files).
- ``MLflowSink``: Ray's own ``setup_mlflow`` (tracking URI, experiment, run name, the train section as
  params), then ``mlflow.log_metrics`` per record.
``RunUpload`` copies ``metrics.jsonl`` and ``tensorboard/`` from rank 0's local run folder to
``<storage_path>/<name>/`` (a no-op when that *is* the local folder), so S3 runs keep them.
Both extras are imported lazily; a missing package is a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from raggen.errors import ConfigError
from raggen.train.metrics import METRICS_FILE

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = {"step", "time", "epoch", "event"}


class Sink(Protocol):
    def write(self, record: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def scalars(record: Mapping[str, Any]) -> tuple[str, int, dict[str, float]] | None:
    """(section, step, {name: value}) of a record worth plotting: a step's finite numbers under
    ``train``, an eval event's ``eval_*`` numbers under ``eval`` (prefix dropped); else None."""
    if "step" not in record:
        return None
    event = record.get("event")
    if event is not None and event != "eval":
        return None
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or (event == "eval" and not key.startswith("eval_")):
            continue
        out[key[len("eval_") :] if event == "eval" else key] = float(value)
    return ("eval" if event == "eval" else "train"), int(record["step"]), out


def summary_writer_class():
    """The installed ``SummaryWriter``; a ConfigError naming ``train.tensorboard`` when there is none."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.tensorboard: needs the tensorboard package "
                "(pip install tensorboard, or pip install 'raggen[tensorboard]')"
            ) from None
    return SummaryWriter


def require_mlflow() -> None:
    """A ConfigError naming ``train.mlflow_tracking_uri`` when mlflow is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "train.mlflow_tracking_uri: needs the mlflow package (pip install mlflow, or pip install 'raggen[mlflow]')"
        )


def metric_name(name: str) -> str:
    """A name both tools keep as it is (MLflow refuses ``@``, TensorBoard rewrites it to ``_``):
    ``eval/recall@5`` -> ``eval/recall_at_5``."""
    return name.replace("@", "_at_")


class TensorBoardSink:
    """Scalars as ``train/loss``, ``eval/recall_at_5``...; ``purge_step`` hides the steps a resumed run redoes."""

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None, config_yaml: str | None = None):
        self.writer = summary_writer_class()(log_dir=str(log_dir), purge_step=purge_step)
        if config_yaml:  # indented: TensorBoard renders text as markdown
            text = "\n".join("    " + line for line in config_yaml.splitlines())
            self.writer.add_text("config", text, purge_step or 0)

    def write(self, record: Mapping[str, Any]) -> None:
        got = scalars(record)
        if got is None:
            return
        section, step, values = got
        for name, value in values.items():
            self.writer.add_scalar(metric_name(f"{section}/{name}"), value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run per worker-group start (a resumed run is a new MLflow run of the same name; its
    steps continue from the global step, so the curves line up)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, Any] | None = None):
        require_mlflow()
        from ray.air.integrations.mlflow import setup_mlflow

        # rank_zero_only=False: only rank 0 builds sinks, so no need to ask Ray Train for the rank
        self.mlflow = setup_mlflow(
            config=dict(params or {}),
            tracking_uri=tracking_uri,
            experiment_name=experiment,
            run_name=run_name,
            create_experiment_if_not_exists=True,
            rank_zero_only=False,
        )

    def write(self, record: Mapping[str, Any]) -> None:
        got = scalars(record)
        if got:
            section, step, values = got
            self.mlflow.log_metrics({metric_name(f"{section}/{k}"): v for k, v in values.items()}, step=step)

    def flush(self) -> None:
        pass  # every log_metrics call is sent at once

    def close(self) -> None:
        self.mlflow.end_run()


def open_sinks(spec: Mapping[str, Any] | None, start_step: int = 0, config_yaml: str | None = None) -> list[Sink]:
    """The sinks a loop config asks for: ``{"tensorboard_dir": str | None, "mlflow": {...} | None}``."""
    spec = spec or {}
    sinks: list[Sink] = []
    if spec.get("tensorboard_dir"):
        sinks.append(
            TensorBoardSink(
                spec["tensorboard_dir"], purge_step=start_step + 1 if start_step else None, config_yaml=config_yaml
            )
        )
    if spec.get("mlflow"):
        m = spec["mlflow"]
        sinks.append(MLflowSink(m["tracking_uri"], m["experiment"], m["run_name"], m.get("params")))
    return sinks


@dataclass(frozen=True)
class RunUpload:
    """Copies ``names`` (files or folders) under ``local_dir`` to the same names under ``run_uri``."""

    local_dir: str
    run_uri: str
    s3: Mapping[str, Any] | None = None
    names: tuple[str, ...] = (METRICS_FILE, TENSORBOARD_DIR)

    @classmethod
    def from_job(
        cls, metrics_path: str | None, run_uri: str | None, s3: dict[str, Any] | None = None
    ) -> RunUpload | None:
        """From the folder of ``metrics_path`` to ``run_uri``; None unless both are set."""
        if not metrics_path or not run_uri:
            return None
        return cls(os.path.dirname(metrics_path), run_uri, s3)

    def needed(self) -> bool:
        from raggen.storage import is_s3_uri

        if is_s3_uri(self.run_uri):
            return True
        return os.path.realpath(os.path.expanduser(self.run_uri)) != os.path.realpath(self.local_dir)

    def upload(self) -> list[str]:
        """The relative names uploaded (none when the run folder is the local folder)."""
        if not self.needed():
            return []
        from raggen.storage import open_store

        store, done = open_store(self.run_uri, self.s3), []
        for name in self.names:
            path = Path(self.local_dir, name)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in (f for f in files if f.is_file()):
                rel = file.relative_to(self.local_dir).as_posix()
                store.upload_file(file, rel)
                done.append(rel)
        return done

    def try_upload(self) -> bool:
        """``upload`` that logs a failure instead of raising: losing the metrics copy must not end a run
        (the next checkpoint tries again)."""
        try:
            self.upload()
            return True
        except Exception as exc:  # noqa: BLE001 - S3 and filesystem errors alike
            log.warning("could not upload the run files to %s: %s: %s", self.run_uri, type(exc).__name__, exc)
            return False
