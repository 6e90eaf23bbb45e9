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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
        raise RaggenError(
            f"model.generator: {path}: no reader there; rebuild it with `make reader` (raggen pretrain-reader)"
        )


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
    from raggen.app.indexing import build_index_from_config

    build_index_from_config(cfg, passages_uri=str(world_files.passages_v2), version=v2, move_latest=False)


def hot_swap_demo(cfg: RaggenConfig, world_files, timings: dict[str, float], v2: str, num_questions: int = 5) -> dict:
    """Serve v1, ask about facts that v2 changes, move LATEST to v2, swap (no restart), ask again.

    Counts how many answers match the v1 facts before the swap and the v2 facts after it."""
    from raggen.app.serving import serve_from_config, swap_index_from_config
    from raggen.corpus.world import read_changed_facts
    from raggen.index import set_latest
    from raggen.serve.client import ask
    from raggen.train.qa_scores import exact_match

    changed = [c for c in read_changed_facts(world_files.changed) if c.split == "test"] or read_changed_facts(
        world_files.changed
    )
    facts = changed[:num_questions]
    with stage("serve (Ray Serve, index v1)", timings):
        url = serve_from_config(cfg, blocking=False)
        before = [ask(url, f.question, top_k=3) for f in facts]
    with stage("publish v2 (LATEST -> v2) and hot-swap (reconfigure, no restart)", timings):
        set_latest(cfg.index.output, v2, s3_options=cfg.index.s3.storage_options())
        info = swap_index_from_config(cfg, version=v2)
    after = [ask(url, f.question, top_k=3) for f in facts]
    rows = []
    for fact, b, a in zip(facts, before, after):
        row = {
            "question": fact.question,
            "answers_v1": fact.answers_v1,
            "answers_v2": fact.answers_v2,
            "answer_before": b["answer"],
            "answer_after": a["answer"],
            "index_versions": [b["index_version"], a["index_version"]],
            "v1_fact_before": bool(exact_match(b["answer"], fact.answers_v1)),
            "v2_fact_after": bool(exact_match(a["answer"], fact.answers_v2)),
            "v2_evidence_retrieved": any(fact.answers_v2[0].lower() in p["text"].lower() for p in a["passages"]),
        }
        rows.append(row)
        print(
            f"Q: {fact.question}\n  v1 fact {fact.answers_v1[0]!r} -> answer {b['answer']!r} (index {b['index_version']})"
            f"\n  v2 fact {fact.answers_v2[0]!r} -> answer {a['answer']!r} (index {a['index_version']})"
        )
    counts = {k: sum(r[k] for r in rows) for k in ("v1_fact_before", "v2_fact_after", "v2_evidence_retrieved")}
    print(
        f"answers matching the v1 fact before the swap: {counts['v1_fact_before']}/{len(rows)}; "
        f"matching the v2 fact after it: {counts['v2_fact_after']}/{len(rows)}; "
        f"v2 passage in the evidence: {counts['v2_evidence_retrieved']}/{len(rows)}"
    )
    return {"url": url, "questions": rows, "live": info.get("version"), **counts, "asked": len(rows)}


def run_quickstart(cfg: RaggenConfig) -> dict:
    from raggen.app.evaluation import evaluate_from_config
    from raggen.app.indexing import build_index_from_config
    from raggen.app.training import run_training
    from raggen.corpus.world import WorldConfig, write_world
    from raggen.ray_utils import ensure_ray
    from raggen.train.metrics import plot_metrics

    require_reader(cfg.model.generator)
    timings: dict[str, float] = {}
    start = time.time()
    w = cfg.world
    with stage("world", timings):
        files = write_world(
            w.out_dir, WorldConfig(num_entities=w.num_entities, seed=w.seed, changed_fraction=w.changed_fraction)
        )
    ensure_ray()
    run_id = time.strftime("%Y%m%d-%H%M%S")  # published versions are immutable: a rerun adds new ones
    v1, v2 = f"v1-{run_id}", f"v2-{run_id}"
    with stage("index v1 (Ray Data -> FAISS shards -> publish)", timings):
        manifest = build_index_from_config(cfg, passages_uri=str(files.passages_v1), version=v1)
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
    with stage("eval the changed facts' v2 answers on index v1", timings):
        changed_v1 = evaluate_from_config(cfg, checkpoint=result["final"], split="changed")
    swap = hot_swap_demo(cfg, files, timings, v2)
    with stage("eval the changed facts' v2 answers on index v2", timings):
        changed_v2 = evaluate_from_config(cfg, checkpoint=result["final"], split="changed")
    print(
        f"\nchanged facts, scored against their v2 answers: EM {changed_v1.get('em', float('nan')):.2f} on index v1 -> "
        f"{changed_v2.get('em', float('nan')):.2f} on index v2 (no retraining)"
    )
    summary = {
        "before": before,
        "after": after,
        "plot": plot,
        "hot_swap": swap,
        "changed_facts_v2_answers": {"index_v1": changed_v1, "index_v2": changed_v2},
        "timings_s": timings,
        "total_minutes": (time.time() - start) / 60,
    }
    Path(run_dir, "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nquickstart done in {summary['total_minutes']:.1f} min; summary: {run_dir}/quickstart.json")
    return summary
