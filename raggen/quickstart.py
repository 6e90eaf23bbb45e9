"""``raggen quickstart`` (``make demo``): every flow once, on the embedded world, on a laptop.

world -> Ray Data index (v1) -> eval -> JSA-RAG on Ray Train -> eval -> plot -> Ray Serve ->
ask over HTTP -> publish index v2 (changed facts) -> hot-swap -> ask again.
Each stage is a library call that the CLI also exposes; this module only sequences them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from raggen.config import RaggenConfig
from raggen.errors import RaggenError

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("em", "f1", "recall@1", "recall@5", "gold_recall@1", "gold_recall@5")


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n=== {name}", flush=True)
    start = time.time()
    yield
    timings[name] = time.time() - start
    print(f"--- {name}: {timings[name]:.1f}s", flush=True)


def require_reader(path: str) -> None:
    """The quickstart reads with a pre-trained reader; say how to make it rather than train on noise."""
    if not os.path.isdir(path) or not any(Path(path).glob("*.safetensors")):
        raise RaggenError(f"model.generator: {path}: no reader there; rebuild it with `make reader` (raggen pretrain-reader)")


def comparison_table(before: dict, after: dict) -> str:
    rows = ["| metric | before | after |", "|---|---|---|"]
    for key in SUMMARY_KEYS:
        if key in before or key in after:
            rows.append(f"| {key} | {before.get(key, float('nan')):.3f} | {after.get(key, float('nan')):.3f} |")
    return "\n".join(rows)


def build_v2_unpublished(cfg: RaggenConfig, world_files, v1: str, v2: str) -> None:
    """Upload index v2 (the changed facts) but keep LATEST on v1: a staged release.

    Built before Serve starts because on 2 cores Ray Data's read tasks (1 CPU each) cannot get a
    CPU beside the encoder actor and the Serve replicas.
    """
    from raggen.index import build_index, set_latest

    kwargs = cfg.index.build_kwargs()
    build_index(**{**kwargs, "passages_uri": str(world_files.passages_v2), "version": v2})
    set_latest(cfg.index.output, v1, s3_options=kwargs["s3_options"])


def hot_swap_demo(cfg: RaggenConfig, world_files, timings: dict[str, float], v2: str) -> dict:
    """Serve v1, ask about a fact that v2 changes, move LATEST to v2, swap, ask again."""
    from raggen.corpus.world import read_changed_facts
    from raggen.index import set_latest
    from raggen.serve.app import serve_from_config, swap_index_from_config
    from raggen.serve.client import ask

    changed = [c for c in read_changed_facts(world_files.changed) if c.split == "test"] or read_changed_facts(world_files.changed)
    fact = changed[0]
    with stage("serve (Ray Serve, index v1)", timings):
        url = serve_from_config(cfg, blocking=False)
        before = ask(url, fact.question, top_k=3)
    print(f"Q: {fact.question}\n  v1 fact: {fact.answers_v1}  answer: {before['answer']!r}  "
          f"top passage: {before['passages'][0]['text'][:120]}...  (index {before['index_version']})")
    with stage("publish v2 (LATEST -> v2) and hot-swap (reconfigure, no restart)", timings):
        set_latest(cfg.index.output, v2, s3_options=cfg.index.s3.storage_options())
        info = swap_index_from_config(cfg, version=v2)
        after = ask(url, fact.question, top_k=3)
    print(f"  v2 fact: {fact.answers_v2}  answer: {after['answer']!r}  "
          f"top passage: {after['passages'][0]['text'][:120]}...  (index {after['index_version']})")
    evidence_v2 = any(fact.answers_v2[0].lower() in p["text"].lower() for p in after["passages"])
    print(f"  v2 fact in the retrieved evidence: {evidence_v2}")
    return {"url": url, "question": fact.question, "answers_v1": fact.answers_v1, "answers_v2": fact.answers_v2,
            "answer_v1_index": before["answer"], "answer_v2_index": after["answer"],
            "index_versions": [before["index_version"], after["index_version"]], "live": info.get("version"),
            "v2_evidence_retrieved": evidence_v2}


def run_quickstart(cfg: RaggenConfig) -> dict:
    from raggen.corpus.world import WorldConfig, write_world
    from raggen.index import build_index
    from raggen.ray_utils import ensure_ray
    from raggen.train.evaluate import evaluate_from_config
    from raggen.train.metrics import plot_metrics
    from raggen.train.trainer import run_training

    require_reader(cfg.model.generator)
    timings: dict[str, float] = {}
    start = time.time()
    w = cfg.world
    with stage("world", timings):
        files = write_world(w.out_dir, WorldConfig(num_entities=w.num_entities, seed=w.seed, changed_fraction=w.changed_fraction))
    ensure_ray()
    run_id = time.strftime("%Y%m%d-%H%M%S")  # published versions are immutable: a rerun adds new ones
    v1, v2 = f"v1-{run_id}", f"v2-{run_id}"
    with stage("index v1 (Ray Data -> FAISS shards -> publish)", timings):
        manifest = build_index(**{**cfg.index.build_kwargs(), "passages_uri": str(files.passages_v1), "version": v1})
    print(f"index {manifest.version}: {manifest.num_passages} passages, {len(manifest.shards)} shards")
    with stage("index v2 (changed facts) uploaded, LATEST kept on v1", timings):
        build_v2_unpublished(cfg, files, v1, v2)
    with stage("eval before training", timings):
        before = evaluate_from_config(cfg, split="test")
    with stage(f"train {cfg.train.estimator} on Ray Train ({cfg.train.steps} steps)", timings):
        result = run_training(cfg)
    with stage("eval after training", timings):
        after = evaluate_from_config(cfg, checkpoint=result["final"], split="test")
    run_dir = result["run_dir"]
    plot = plot_metrics(run_dir, os.path.join(run_dir, "metrics.png"))
    print(f"\nplot: {plot}\n\n{comparison_table(before, after)}")
    cfg.serve.model_dir = result["final"]
    swap = hot_swap_demo(cfg, files, timings, v2)
    summary = {"before": before, "after": after, "plot": plot, "hot_swap": swap, "timings_s": timings,
               "total_minutes": (time.time() - start) / 60}
    Path(run_dir, "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nquickstart done in {summary['total_minutes']:.1f} min; summary: {run_dir}/quickstart.json")
    return summary
