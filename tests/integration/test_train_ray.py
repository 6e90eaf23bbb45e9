"""End-to-end training on Ray Train: 2 CPU workers (DDP over gloo), tiny models, a tiny index.

Each estimator runs a few steps through ``run_training`` and must lower the loss of a fixed batch
(the RAG-Sequence marginal NLL over the top-K, or for G-Rerank the FiD NLL under the hard top-k
mask), and move exactly the models it trains. A JSA run is then started again under the same name
and must resume at the right step with the same chain cache; a run whose rank-1 worker dies
mid-run (max_failures=1) must still finish.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import publish_encoded_index

pytestmark = pytest.mark.integration

STEPS = 4
EVAL_EXAMPLES = 8


# ----------------------------------------------------------------------------------- fixtures


def _publish_tiny_index(passages, encoder_dir: str, out_uri: str, work: Path) -> None:
    """Encode passages with the tiny encoder and publish a 2-shard Flat index (no Ray Data: the
    Ray Data build is tested with the index package)."""
    from raggen.models import TextEncoder

    publish_encoded_index(passages, out_uri, TextEncoder.from_pretrained(encoder_dir, max_length=64), encoder_dir, work)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_cluster):
    from raggen.corpus import read_passages, write_qa_jsonl
    from raggen.corpus.world import WorldConfig, build_world, write_world
    from raggen.models import make_tiny_encoder, make_tiny_generator, make_tiny_reranker
    from raggen.train.heldout import split_heldout

    root = tmp_path_factory.mktemp("train")
    files = write_world(root / "world", WorldConfig(num_entities=30, seed=0))
    world = build_world(WorldConfig(num_entities=30, seed=0))
    # held-out means held out: the loss the tests compare before/after is on questions no step trains on
    train_rows, heldout = split_heldout(world.train, 48, EVAL_EXAMPLES)
    train_file = write_qa_jsonl(root / "train-small.jsonl", train_rows)
    models = {
        "encoder": make_tiny_encoder(str(root / "enc")),
        "generator": make_tiny_generator(str(root / "gen")),
        "reranker": make_tiny_reranker(str(root / "rr")),
    }
    _publish_tiny_index(read_passages(files.passages_v1), models["encoder"], str(root / "index"), root / "index-work")
    yield {
        "root": root,
        "train_file": str(train_file),
        "dev_file": str(files.dev_jsonl),
        "index": str(root / "index"),
        "models": models,
        "eval": heldout,
        "passages": str(files.passages_v1),
    }


def _config(setup, name: str, estimator: str, *overrides: str):
    from raggen.config import load_config

    m = setup["models"]
    base = [
        f"train.name={name}",
        f"train.storage_path={setup['root'] / 'runs'}",
        f"train.train_file={setup['train_file']}",
        f"train.index={setup['index']}",
        f"train.estimator={estimator}",
        f"train.steps={STEPS}",
        "train.batch_size=4",
        "train.lr=2e-3",
        "train.top_k=3",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.checkpoint_every=2",
        "train.use_gpu=false",
        f"model.query_encoder.name_or_path={m['encoder']}",
        "model.query_encoder.max_length=32",
        f"model.generator={m['generator']}",
        f"model.reranker={m['reranker']}",
        "model.max_source_length=96",
        "model.max_target_length=12",
        "train.jsa.num_proposals=4",
        "train.gumbel.candidates=4",
        "train.gumbel.k=2",
        "train.gumbel.train_reader=true",
    ]
    return load_config(None, base + list(overrides))


# ----------------------------------------------------------------------------------- measures


def heldout_nll(
    models: dict, estimator: str, index, examples: list[dict], *, top_k: int = 3, candidates: int = 4, k: int = 2
) -> float:
    """The fixed batch's loss under ``models``: the RAG-Sequence marginal NLL over the top-K, or
    for G-Rerank the FiD reader's NLL under the reranker's hard top-k mask. Eval mode, no grad."""
    from raggen.objectives import hard_topk_mask, passage_attention_bias, rag_sequence_nll, sequence_logprob
    from raggen.train.step import Batch, _scores, retrieve

    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    batch = Batch.from_rows(examples)
    gen = models["generator"]
    try:
        with torch.no_grad():
            q = models["query_encoder"](batch.questions)
            if estimator == "gumbel-rerank":
                cands = retrieve(index, q, candidates)
                mask = hard_topk_mask(models["reranker"](batch.questions, cands.passages), k)
                tok, m = gen.fid_token_logprobs(
                    batch.questions, cands.passages, batch.targets, passage_attention_bias(mask)
                )
                return float(-sequence_logprob(tok, m).mean())
            cands = retrieve(index, q, top_k)
            tok, m = gen.token_logprobs(batch.questions, cands.passages, batch.targets)
            return float(rag_sequence_nll(_scores(q, cands), tok, m).mean())
    finally:
        for name, m in models.items():
            m.train(modes[name])


def _param_digest(models: dict, roles) -> str:
    import hashlib

    h = hashlib.sha256()
    for role in sorted(roles):
        for name, p in sorted(models[role].state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _estimators_train_func(config: dict) -> None:
    """Ray Train worker function of the grouped estimator test: for each estimator, the loop's own
    ``setup_worker`` (DDP over the 2 workers) and ``train_step``; rank 0 reports loss before/after,
    which models moved, and whether the DDP replicas ended identical."""
    import ray
    import ray.train
    import torch.distributed as dist

    from raggen.train.batches import BatchSchedule, example_rows, rank_share
    from raggen.train.loop import setup_worker, train_step

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rows = example_rows(rank_share(ray.get(config["rows"]), rank, world))  # as the loop takes its share
    results = {}
    for estimator, job in config["runs"].items():
        worker = setup_worker(job, rank, world, torch.device("cpu"), None)
        start = {r: {k: v.clone() for k, v in m.state_dict().items()} for r, m in worker.models.items()}
        before = heldout_nll(worker.models, estimator, worker.index, config["eval"])
        schedule = BatchSchedule(rows, job.loop.batch_size, seed=rank)
        losses = [train_step(worker, schedule.batch(s), s)["loss"] for s in range(job.loop.steps)]
        after = heldout_nll(worker.models, estimator, worker.index, config["eval"])
        moved = sorted(
            r
            for r, m in worker.models.items()
            if any(not torch.equal(start[r][k], v) for k, v in m.state_dict().items())
        )
        digests = [None] * world
        dist.all_gather_object(digests, _param_digest(worker.models, worker.roles))
        results[estimator] = {
            "before": before,
            "after": after,
            "losses": losses,
            "moved": moved,
            "roles": sorted(worker.roles),
            "replicas_equal": len(set(digests)) == 1,
        }
    if rank == 0:  # Ray Train V2 keeps only metrics that come with a checkpoint: write a file instead
        Path(config["out"]).write_text(json.dumps(results))
    ray.train.report({"estimators": len(results)})


# ----------------------------------------------------------------------------------- tests

GROUPED = ["rag-sequence", "rag-token", "vrag", "emdr2", "pdist", "gumbel-rerank"]
TRAINS = {
    "gumbel-rerank": ["generator", "reranker"],
    "vrag": ["generator", "posterior_encoder", "query_encoder"],
    "jsa": ["generator", "posterior_encoder", "query_encoder"],
}


@pytest.fixture(scope="module")
def grouped_results(setup):
    """One 2-worker TorchTrainer run that trains every non-JSA estimator in turn (worker-group
    start-up costs 10-40 s on 2 cores, so one run per estimator would be slow)."""
    import ray
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raggen.app.training import train_job
    from raggen.train.trainer import qa_items

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    runs = {est: train_job(_config(setup, f"grouped-{est}", est)) for est in GROUPED}
    eval_rows = [{"id": e.id, "question": e.question, "answers": e.answers} for e in setup["eval"]]
    trainer = TorchTrainer(
        _estimators_train_func,
        train_loop_config={
            "runs": runs,
            "eval": eval_rows,
            "out": str(setup["root"] / "grouped.json"),
            "rows": ray.put(qa_items(setup["train_file"])),
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="grouped", storage_path=str(setup["root"] / "runs")),
    )
    trainer.fit()
    return json.loads((setup["root"] / "grouped.json").read_text())


@pytest.mark.parametrize("estimator", GROUPED)
def test_estimator_lowers_the_loss_on_two_workers(grouped_results, estimator):
    r = grouped_results[estimator]
    assert r["after"] < r["before"], f"{estimator}: held-out loss {r['before']:.3f} -> {r['after']:.3f}"
    assert all(np.isfinite(r["losses"]))
    assert r["roles"] == TRAINS.get(estimator, ["generator", "query_encoder"])
    assert r["moved"] == r["roles"], "exactly the trained models move (frozen ones stay put)"
    assert r["replicas_equal"], "DDP replicas diverged"


def test_jsa_on_s3_survives_a_killed_worker_then_resumes_with_its_chain_cache(setup, s3_bucket, monkeypatch, tmp_path):
    """Checkpoints on S3 (a moto server, through Ray Train's pyarrow filesystem). Run 1: rank 1
    dies at step 3 (max_failures=1); the group restarts from the step-2 checkpoint and finishes.
    Run 2 under the same name continues from step 4 with the same JSA chain cache."""
    from raggen.app.training import run_training
    from raggen.index import open_index
    from raggen.models.build import build_models
    from raggen.models.exports import resolve_export
    from raggen.storage import download
    from raggen.train.checkpointing import JSA_CACHE_FILE, read_checkpoint
    from raggen.train.distributed import cache_digest
    from raggen.train.job import FailureInjection
    from raggen.train.metrics import plot_metrics, read_metrics
    from raggen.train.trainer import local_metrics_path

    bucket, s3 = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["aws_secret_access_key"])
    on_s3 = [
        f"train.storage_path=s3://{bucket}/runs",
        f"train.s3.endpoint_url={s3['endpoint_url']}",
        f"train.s3.region={s3['region_name']}",
    ]
    marker = setup["root"] / "killed.marker"
    cfg = _config(setup, "jsa", "jsa", "train.max_failures=1", *on_s3)
    first = run_training(cfg, inject_failure=FailureInjection(rank=1, step=3, marker=str(marker)))
    assert marker.exists(), "the failure was never injected"
    assert first["final"] == f"s3://{bucket}/runs/jsa/final" and first["metrics"]["step"] == STEPS
    download(first["final"], tmp_path / "final1", s3)
    state = read_checkpoint(tmp_path / "final1")  # the export LATEST names, verified
    final1 = Path(resolve_export(str(tmp_path / "final1")))
    assert state.step == STEPS
    metrics_path = local_metrics_path(cfg.train.storage_path, "jsa")
    steps, events = read_metrics(metrics_path)
    assert [e["step"] for e in events if e["event"] == "restored"] == [2]  # the replacement group resumed at 2
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert all(0.0 <= s["acceptance_rate"] <= 1.0 and np.isfinite(s["loss"]) for s in steps)
    assert read_metrics(final1 / "metrics.jsonl")[0] == steps  # the JSONL travels with checkpoints

    spec, index = cfg.model, open_index(cfg.train.index)
    eval_rows = [{"id": e.id, "question": e.question, "answers": e.answers} for e in setup["eval"]]
    before = heldout_nll(build_models(spec, "jsa"), "jsa", index, eval_rows)
    after = heldout_nll(build_models(spec, "jsa", state.model_dirs), "jsa", index, eval_rows)
    assert after < before, f"jsa: held-out loss {before:.3f} -> {after:.3f}"
    assert sorted(state.model_dirs) == TRAINS["jsa"]
    saved = torch.load(final1 / JSA_CACHE_FILE, weights_only=True)
    assert len(saved["states"]) >= 8  # both workers' chains (disjoint shards) are in the checkpoint

    evals = ["train.eval_every=2", "train.eval_examples=4", f"train.dev_file={setup['dev_file']}"]
    second = run_training(_config(setup, "jsa", "jsa", f"train.steps={STEPS + 2}", *on_s3, *evals))
    assert second["metrics"]["step"] == STEPS + 2
    assert 0.0 <= second["metrics"]["eval_recall@5"] <= 1.0 and "eval_em" in second["metrics"]
    steps, events = read_metrics(metrics_path)
    assert [e["step"] for e in events if e["event"] == "eval"] == [STEPS + 2]  # rank 0 scored the dev subset
    assert plot_metrics(Path(metrics_path).parent).endswith(".png")
    restored = [e for e in events if e["event"] == "restored"]
    assert restored[-1]["step"] == STEPS
    assert restored[-1]["jsa_cache_digest"] == cache_digest(saved)
    assert restored[-1]["jsa_cache_entries"] == len(saved["states"])
    assert [s["step"] for s in steps] == list(range(1, STEPS + 3))
    download(second["final"], tmp_path / "final2", s3)
    assert read_checkpoint(tmp_path / "final2").step == STEPS + 2


def test_config_errors_name_the_field(setup):
    from raggen.app.training import run_training, train_job
    from raggen.errors import ConfigError

    cfg = _config(setup, "bad", "gumbel-rerank", "train.train_passage_encoder=true")
    with pytest.raises(ConfigError, match="train.train_passage_encoder"):
        train_job(cfg)
    with pytest.raises(ConfigError, match="train.train_file"):
        run_training(_config(setup, "bad", "jsa", f"train.train_file={setup['root'] / 'missing.jsonl'}"))


def test_trained_passage_encoder_refreshes_the_index_on_schedule_and_resumes_on_it(setup, tmp_path):
    """train_passage_encoder + refresh_index_every=2 over 3 steps: the Ray Data index pipeline runs
    inside the run after step 2 (not after 1 or 3) and publishes into the run's own index root; the
    refreshed vectors are the step-2 encoder's; the starting index is untouched; a rerun resumes on
    the refreshed index the checkpoint recorded."""
    from raggen.app.training import run_training
    from raggen.index import load_version, verify_index
    from raggen.index.latest import read_latest
    from raggen.models import TextEncoder, passage_text
    from raggen.train.checkpointing import read_checkpoint
    from raggen.train.metrics import read_metrics
    from raggen.train.trainer import local_metrics_path

    enc = setup["models"]["encoder"]
    refresh = [
        "train.train_passage_encoder=true",
        "train.refresh_index_every=2",
        "train.steps=3",
        "train.cpus_per_worker=0.25",
        f"index.passages={setup['passages']}",
        f"index.encoder.name_or_path={enc}",
        "index.encoder.max_length=64",
        "index.num_shards=2",
        "index.actor_num_cpus=0.25",
        "index.batch_size=32",
    ]
    before_start = verify_index(setup["index"])
    cfg = _config(setup, "refresh", "rag-sequence", *refresh)
    out = run_training(cfg)
    run_index = out["index"]
    assert run_index == str(setup["root"] / "runs" / "refresh" / "index")
    steps, events = read_metrics(local_metrics_path(cfg.train.storage_path, "refresh"))
    refreshes = [e for e in events if e["event"] == "index_refresh"]
    assert [e["step"] for e in refreshes] == [2]
    assert read_latest(run_index) == refreshes[-1]["version"]
    assert verify_index(run_index, refreshes[0]["version"]).num_passages == before_start.num_passages
    assert verify_index(setup["index"]).version == before_start.version  # the starting index is untouched
    assert all(np.isfinite(s["loss"]) for s in steps) and [s["step"] for s in steps] == [1, 2, 3]

    # the refreshed index holds what the step-2 encoder snapshot computes, and not the start's vectors
    snapshot = setup["root"] / "runs" / "refresh" / "refresh" / "passage-encoder-step-0000002"
    refreshed, start = load_version(run_index, refreshes[-1]["version"]), load_version(setup["index"])
    table = refreshed.shards[0].passages
    texts = [passage_text(t, x) for t, x in zip(table["title"].to_pylist(), table["text"].to_pylist())]
    want = TextEncoder.from_pretrained(str(snapshot), max_length=64).encode(texts).numpy()
    got = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, want, atol=1e-4)
    old = {
        i: v
        for sh in start.shards
        for i, v in zip(
            sh.passages["id"].to_pylist(), np.stack(sh.passages["embedding"].to_numpy(zero_copy_only=False))
        )
    }
    drift = np.abs(got - np.stack([old[i] for i in table["id"].to_pylist()])).max()
    assert drift > 1e-3, "the passage encoder did not move"

    final = read_checkpoint(out["final"])
    assert "passage_encoder" in final.model_dirs and final.extra["index"]["version"] == refreshes[-1]["version"]
    again = run_training(_config(setup, "refresh", "rag-sequence", *refresh[:2], "train.steps=4", *refresh[3:]))
    _, events = read_metrics(local_metrics_path(cfg.train.storage_path, "refresh"))
    started = [e for e in events if e["event"] == "started"][-1]
    assert started["step"] == 3 and started["index_version"] == refreshes[-1]["version"]
    assert again["metrics"]["step"] == 4
