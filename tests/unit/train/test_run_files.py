"""What a run saves beside its weights: the resolved config (run folder and every checkpoint)."""

from __future__ import annotations

import os

from raggen.app.training import config_yaml, train_job
from raggen.config import load_config
from raggen.train.checkpointing import CONFIG_FILE, export_checkpoint, write_checkpoint
from raggen.train.trainer import save_run_config

OVERRIDES = [
    "train.name=exp1",
    "train.lr=1e-4",
    "train.warmup_steps=5",
    "train.lr_schedule=cosine",
    "train.retriever_lr=2e-5",
    "model.generator=some/reader",
]


def test_config_yaml_round_trips_to_the_same_config(tmp_path):
    cfg = load_config(overrides=OVERRIDES)
    text = config_yaml(cfg)
    assert "lr_schedule: cosine" in text and "warmup_steps: 5" in text and "generator: some/reader" in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(tmp_path / "c.yaml") != load_config()


def test_run_config_goes_to_the_run_folder_and_into_checkpoints(tmp_path):
    cfg = load_config(overrides=[*OVERRIDES, f"train.storage_path={tmp_path / 'runs'}", "train.tensorboard=true"])
    job = train_job(cfg, metrics_path=str(tmp_path / "runs" / "exp1" / "metrics.jsonl"))
    assert job.config_yaml == config_yaml(cfg)
    assert job.run_uri == f"{tmp_path / 'runs'}/exp1"
    assert (job.loop.warmup_steps, job.loop.lr_schedule, job.loop.log_every) == (5, "cosine", 10)
    assert job.sinks == {"tensorboard_dir": os.path.join(tmp_path, "runs", "exp1", "tensorboard"), "mlflow": None}

    uri = save_run_config(job.config_yaml, cfg.train.storage_path, cfg.train.name)
    assert load_config(uri) == cfg

    write_checkpoint(tmp_path / "ckpt", models={}, step=3, config_yaml=job.config_yaml)
    exported = export_checkpoint(tmp_path / "ckpt", str(tmp_path / "final"))
    assert load_config(os.path.join(exported, CONFIG_FILE)) == cfg
    write_checkpoint(tmp_path / "bare", models={}, step=3)
    assert not (tmp_path / "bare" / CONFIG_FILE).exists()
