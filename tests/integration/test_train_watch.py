"""Watching a run: one short JSA run on S3 (a moto server) with warm-up + cosine decay, evaluation
every 2 steps, TensorBoard on and a progress line every 2 steps. It must leave in the bucket, beside
its checkpoints, the resolved config (also inside every checkpoint), ``metrics.jsonl`` (equal to
rank 0's local file) and the TensorBoard events; the logged learning rates must follow the
schedule; rank 0 must have logged its progress lines; ``raggen report`` reads the run from S3 and
``raggen eval`` shows a progress bar."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.helpers import publish_encoded_index

pytestmark = pytest.mark.integration

STEPS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_s3, ray_with_credentials):
    """A tiny world and index; the shared Ray's workers hold the moto credentials (rank 0's boto3
    uploads the run files)."""
    from raggen.corpus import read_passages, write_qa_jsonl
    from raggen.corpus.world import WorldConfig, build_world, write_world
    from raggen.models import TextEncoder, make_tiny_encoder, make_tiny_generator

    root = tmp_path_factory.mktemp("watch")
    files = write_world(root / "world", WorldConfig(num_entities=30, seed=0))
    train_file = write_qa_jsonl(root / "train.jsonl", build_world(WorldConfig(num_entities=30, seed=0)).train[:16])
    encoder, generator = make_tiny_encoder(str(root / "enc")), make_tiny_generator(str(root / "gen"))
    tiny = TextEncoder.from_pretrained(encoder, max_length=64)
    publish_encoded_index(read_passages(files.passages_v1), str(root / "index"), tiny, encoder, root / "index-work")
    return {
        "root": root,
        "train_file": str(train_file),
        "dev_file": str(files.dev_jsonl),
        "index": str(root / "index"),
        "world": str(root / "world"),
        "encoder": encoder,
        "generator": generator,
    }


def _log_sizes() -> dict[Path, int]:
    """The size of every log file of the Ray session (the shared cluster's: earlier modules' too)."""
    import ray._private.worker

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return {p: p.stat().st_size for p in logs.rglob("*") if p.is_file() and p.suffix in (".err", ".out", ".log")}


def _worker_log_text(since: dict[Path, int]) -> str:
    """What the session's processes wrote to their log files after ``since`` (rank 0's progress lines
    among it)."""
    parts = []
    for path in _log_sizes():
        with open(path, "rb") as f:
            f.seek(since.get(path, 0))
            parts.append(f.read().decode(errors="replace"))
    return "\n".join(parts)


def test_an_s3_run_keeps_config_metrics_and_tensorboard_and_shows_progress(world, s3_bucket, tmp_path, capfd):
    from raggen.app.evaluation import evaluate_from_config
    from raggen.app.training import run_training
    from raggen.config import load_config
    from raggen.storage import list_uri, read_bytes
    from raggen.train.metrics import read_metrics
    from raggen.train.report import load_run, plot_runs
    from raggen.train.trainer import local_metrics_path

    bucket, s3 = s3_bucket
    cfg = load_config(
        None,
        [
            "train.name=watch",
            f"train.storage_path=s3://{bucket}/runs",
            f"train.s3.endpoint_url={s3['endpoint_url']}",
            f"train.s3.region={s3['region_name']}",
            f"train.train_file={world['train_file']}",
            f"train.dev_file={world['dev_file']}",
            f"train.index={world['index']}",
            f"world.out_dir={world['world']}",
            "train.estimator=jsa",
            f"train.steps={STEPS}",
            "train.batch_size=4",
            "train.top_k=3",
            "train.jsa.num_proposals=4",
            "train.lr=2e-3",
            "train.retriever_lr=1e-3",
            "train.warmup_steps=2",
            "train.lr_schedule=cosine",
            "train.checkpoint_every=2",
            "train.eval_every=2",
            "train.eval_examples=2",
            "train.log_every=2",
            "train.tensorboard=true",
            "train.num_workers=1",
            "train.cpus_per_worker=0.5",
            "train.use_gpu=false",
            f"model.query_encoder.name_or_path={world['encoder']}",
            "model.query_encoder.max_length=32",
            f"model.generator={world['generator']}",
            "model.max_source_length=96",
            "model.max_target_length=12",
        ],
    )
    run = f"s3://{bucket}/runs/watch"
    logs_before = _log_sizes()
    out = run_training(cfg)
    assert out["config"] == f"{run}/config.yaml"

    # the resolved config: in the run folder and in every checkpoint, and it loads back as the same config
    (tmp_path / "config.yaml").write_bytes(read_bytes(f"{run}/config.yaml", s3))
    assert load_config(tmp_path / "config.yaml") == cfg
    keys = list_uri(run, s3)
    states = [k for k in keys if k.endswith("/train_state.json")]
    # Ray keeps 2 checkpoints, plus the model export final/<step>-<id>/
    assert len(states) >= 2 and any(re.fullmatch(r"final/4-\w+/train_state\.json", k) for k in states)
    for state in states:
        assert read_bytes(f"{run}/{state.rsplit('/', 1)[0]}/config.yaml", s3) == (tmp_path / "config.yaml").read_bytes()

    # metrics.jsonl in the bucket, the same as rank 0's local file; the eval events and the schedule in it
    remote = load_run(run, "watch", s3)
    steps, events = read_metrics(local_metrics_path(cfg.train.storage_path, "watch"))
    assert remote.steps == steps and [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [e["step"] for e in remote.evals] == [2, 4] and all("eval_recall@5" in e for e in remote.evals)
    # warm-up over steps 1-2 (1/2, 1), then cosine over 2 steps: cos 0 = 1, then (1 + cos(pi/2)) / 2
    assert [s["lr"] for s in steps] == pytest.approx([1e-3, 2e-3, 2e-3, 1e-3])
    assert [s["lr_scale"] for s in steps] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert any(k.startswith("tensorboard/events.out.tfevents.") for k in keys)
    plot_runs([run], tmp_path / "report.png", s3_options=s3)  # raggen report of an s3:// run
    assert (tmp_path / "report.png").stat().st_size > 10_000

    # rank 0's progress lines went through logging to its log file
    text = _worker_log_text(since=logs_before)
    line = re.compile(r"step (\d)/4 loss \S+ acceptance [\d.]+ (?:\w+ \S+ )*ex/s [\d.]+ lr [\d.]+e-0\d eta \d+s")
    assert sorted({int(m.group(1)) for m in line.finditer(text)}) == [2, 4], "no progress lines in the worker logs"

    # raggen eval on the final checkpoint (downloaded from S3) shows a progress bar on stderr
    capfd.readouterr()
    scores = evaluate_from_config(cfg, checkpoint=out["final"], split="dev")
    assert scores["num_examples"] == 2
    err = capfd.readouterr().err
    assert "eval dev" in err and "2/2" in err
    assert os.path.basename(out["final"]) == "final"
