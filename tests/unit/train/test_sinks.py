"""Metric sinks (TensorBoard, MLflow), their missing-package errors, and the run-file upload."""

from __future__ import annotations

import logging
import struct
import sys

import pytest

from raggen.config import load_config
from raggen.errors import ConfigError
from raggen.train.metrics import MetricsWriter
from raggen.train.sinks import RunUpload, TensorBoardSink, metric_name, require_mlflow, scalars, summary_writer_class

STEP = {
    "step": 3,
    "epoch": 0,
    "time": 1.7e9,
    "loss": 2.5,
    "lr": 1e-4,
    "acceptance_rate": None,
    "flag": True,
    "note": "x",
    "grad_norm": float("nan"),
}
EVAL = {"event": "eval", "step": 4, "eval_em": 0.25, "eval_recall@5": 0.5, "time": 1.7e9}


def test_scalars_pick_the_plottable_numbers():
    assert scalars(STEP) == ("train", 3, {"loss": 2.5, "lr": 1e-4})
    assert scalars(EVAL) == ("eval", 4, {"em": 0.25, "recall@5": 0.5})
    assert scalars({"event": "restored", "step": 2, "jsa_cache_entries": 8}) is None
    assert metric_name("eval/recall@5") == "eval/recall_at_5"


def _tfrecords(path) -> list[bytes]:
    """The payloads of a TFRecord file (length, crc, data, crc): TensorBoard's event-file framing."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(data[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
    return out


def test_tensorboard_sink_writes_train_and_eval_scalars(tmp_path):
    from tensorboardX.proto import event_pb2  # ray[train] brings tensorboardX

    sink = TensorBoardSink(tmp_path / "tb", config_yaml="train:\n  lr: 1\n")
    with MetricsWriter(tmp_path / "metrics.jsonl", sinks=[sink]) as w:
        for step in (1, 2):
            w.write({"step": step, "loss": 3.0 - step, "lr": 1e-3 * step, "time": 0.0})
        w.write(EVAL)
        w.write({"event": "restored", "step": 2})
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    got, texts = {}, []
    for raw in _tfrecords(files[0]):
        event = event_pb2.Event.FromString(raw)
        for value in event.summary.value:
            if value.HasField("simple_value"):
                got[(value.tag, event.step)] = value.simple_value
            else:
                texts.append(value.tag)
    assert got == pytest.approx(
        {
            ("train/loss", 1): 2.0,
            ("train/lr", 1): 1e-3,
            ("train/loss", 2): 1.0,
            ("train/lr", 2): 2e-3,
            ("eval/em", 4): 0.25,
            ("eval/recall_at_5", 4): 0.5,
        }
    )
    assert any("config" in t for t in texts)


def test_missing_optional_packages_are_config_errors_naming_the_field(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # None: "not installed" to import
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"train\.tensorboard: .*pip install tensorboard"):
        summary_writer_class()
    with pytest.raises(ConfigError, match=r"train\.mlflow_tracking_uri: .*pip install mlflow"):
        require_mlflow()
    from raggen.app.training import train_job

    with pytest.raises(ConfigError, match=r"train\.tensorboard"):  # on the driver, before Ray starts
        train_job(load_config(overrides=["train.tensorboard=true"]))
    with pytest.raises(ConfigError, match=r"train\.mlflow_tracking_uri"):
        train_job(load_config(overrides=["train.mlflow_tracking_uri=http://127.0.0.1:5000"]))


def test_run_upload_copies_metrics_and_tensorboard_and_skips_its_own_folder(tmp_path):
    local = tmp_path / "local"
    (local / "tensorboard" / "sub").mkdir(parents=True)
    (local / "metrics.jsonl").write_text('{"step": 1}\n')
    (local / "tensorboard" / "sub" / "events.out.tfevents.1").write_bytes(b"\x01\x02")
    (local / "refresh").mkdir()
    (local / "refresh" / "big.bin").write_bytes(b"not mine to upload")
    upload = RunUpload(str(local), str(tmp_path / "store" / "run"))
    assert upload.upload() == ["metrics.jsonl", "tensorboard/sub/events.out.tfevents.1"]
    assert (tmp_path / "store" / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (tmp_path / "store" / "run" / "tensorboard" / "sub" / "events.out.tfevents.1").read_bytes() == b"\x01\x02"
    assert not (tmp_path / "store" / "run" / "refresh").exists()
    assert RunUpload(str(local), str(local) + "/").upload() == []  # local storage: the file is already there
    assert RunUpload.from_job(None, "s3://b/r") is None
    made = RunUpload.from_job(str(local / "metrics.jsonl"), "s3://b/r")
    assert made == RunUpload(str(local), "s3://b/r", None)


def test_a_failed_upload_is_a_warning_not_an_error(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder should be")
    with caplog.at_level(logging.WARNING, logger="raggen.train.sinks"):
        assert RunUpload(str(tmp_path), str(blocker / "run")).try_upload() is False
    assert "could not upload" in caplog.text


class _Flaky:
    """A sink whose server goes away at the second record."""

    def __init__(self):
        self.got, self.closed = [], False

    def write(self, record):
        if len(self.got) == 1:
            raise ConnectionError("tracking server unreachable")
        self.got.append(record["step"])

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_a_failing_sink_is_dropped_and_the_jsonl_keeps_every_record(tmp_path, caplog):
    flaky, steady = _Flaky(), _Flaky()
    steady.write = lambda record: steady.got.append(record["step"])
    with caplog.at_level(logging.WARNING, logger="raggen.train.metrics"):
        with MetricsWriter(tmp_path / "metrics.jsonl", sinks=[flaky, steady]) as w:
            for step in (1, 2, 3):
                w.write({"step": step, "loss": 1.0})
    assert flaky.got == [1] and not flaky.closed  # dropped at step 2, never called again
    assert steady.got == [1, 2, 3] and steady.closed
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    assert "_Flaky failed in write (ConnectionError" in caplog.text
