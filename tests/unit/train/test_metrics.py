"""Evaluation metrics (EM/F1/recall), the metrics JSONL + plot, checkpoint folders, and the pure
helpers of the training step (candidate union, visited columns, batch schedule)."""

from __future__ import annotations

import pytest
import torch

from raggen.errors import DataError
from raggen.train.metrics import MetricsWriter, plot_metrics, read_metrics

# ----------------------------------------------------------------------------------- metrics JSONL


def test_metrics_jsonl_keeps_the_last_line_per_step_and_plots(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        for step in (1, 2, 3):
            w.write({"step": step, "loss": 3.0 - step, "grad_norm": torch.tensor(0.5), "lr": 1e-3})
        w.write({"event": "restored", "step": 2})
        w.write({"step": 3, "loss": 9.0, "acceptance_rate": float("nan")})  # a replayed step
    path.write_text(path.read_text() + '{"step": 4, "lo')  # a torn last line
    steps, events = read_metrics(path)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[-1]["loss"] == 9.0 and steps[-1]["acceptance_rate"] is None
    assert steps[0]["grad_norm"] == 0.5
    assert events == [{"event": "restored", "step": 2}]
    png = plot_metrics(tmp_path)
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    MetricsWriter(tmp_path / "m.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "m.jsonl").exists()


def test_bad_metrics_file_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match="row 2"):
        read_metrics(path)
    with pytest.raises(DataError, match="no metrics file"):
        plot_metrics(tmp_path / "missing")
