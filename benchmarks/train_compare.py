"""Claim (JSA-RAG, Cao et al. 2025): from the same start and with the same budget, JSA-RAG trains
RAG better than top-K marginalisation (RAG-Sequence, RAG-Token) and VRAG, with a lower-variance
retriever gradient.

On the embedded generated world: the index is built with the Ray Data pipeline from the pretrained
MiniLM encoder; every estimator starts from the same MiniLM query encoder (the posterior of VRAG
and JSA is a copy of it) and the same reader (``--reader``, else artifacts/models/reader, else
raggen/assets/reader, else a fresh reader-size BART, optionally pre-trained with
``--pretrain-reader-steps``), then trains ``--steps`` steps of ``--batch-size`` examples through
Ray Train. Printed: test EM/F1 and answer recall@1/@5 before and after, wall time, and the
retriever gradient variance of each estimator.

Retriever gradient variance: at fixed parameters (the common start, and each estimator's end), the
query encoder's gradient g_m of the estimator's loss on M different mini-batches (eval mode, so
dropout adds nothing); reported as tr Cov = mean_m ||g_m - mean g||^2 and relative to ||mean g||^2.
It mixes data noise (shared by all estimators) and the estimator's own noise (sampling in JSA).

    .venv/bin/python benchmarks/train_compare.py --steps 60 --batch-size 8 --test-examples 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from train_overhead import machine  # noqa: E402

ESTIMATORS = ("rag-sequence", "rag-token", "vrag", "jsa")


def find_reader(args, work: Path) -> tuple[str, str]:
    """(path, how it was found)."""
    if args.reader:
        return args.reader, "--reader"
    for candidate in (ROOT / "artifacts/models/reader", ROOT / "raggen/assets/reader"):
        if (candidate / "config.json").exists():
            return str(candidate), "shipped"
    if args.pretrain_reader_steps:
        from raggen.train.reader import pretrain_reader

        out = str(work / f"reader-{args.pretrain_reader_steps}")
        if not (Path(out) / "config.json").exists():
            pretrain_reader(out, steps=args.pretrain_reader_steps, batch_size=16)
        return out, f"pre-trained here for {args.pretrain_reader_steps} steps"
    from raggen.models import make_tiny_generator

    return make_tiny_generator(
        str(work / "reader-random"), size="reader"
    ), "random init (no reader found: EM/F1 will be ~0)"


def prepare(args, work: Path) -> dict:
    from raggen.corpus.world import WorldConfig, write_world
    from raggen.index import IndexBuildSettings, build_index
    from raggen.models import MINILM_ID
    from raggen.models.retriever import EncoderSpec

    files = write_world(work / "world", WorldConfig(num_entities=args.num_entities, seed=0))
    index = work / "index"
    if not (index / "LATEST").exists():
        build_index(
            str(files.passages_v1),
            str(index),
            encoder=EncoderSpec(name_or_path=MINILM_ID, max_length=128),
            settings=IndexBuildSettings(num_shards=2, actor_num_cpus=1.0, actor_num_gpus=None),
        )
    reader, how = find_reader(args, work)
    return {
        "world": str(work / "world"),
        "train": str(files.train_jsonl),
        "dev": str(files.dev_jsonl),
        "index": str(index),
        "reader": reader,
        "reader_source": how,
    }


def config_for(paths: dict, estimator: str, args, work: Path):
    from raggen.config import load_config

    return load_config(
        None,
        [
            f"world.out_dir={paths['world']}",
            f"train.name=compare-{estimator}-{args.tag}",
            f"train.storage_path={work / 'runs'}",
            f"train.train_file={paths['train']}",
            f"train.dev_file={paths['dev']}",
            f"train.index={paths['index']}",
            f"train.estimator={estimator}",
            f"train.steps={args.steps}",
            f"train.batch_size={args.batch_size}",
            f"train.lr={args.lr}",
            f"train.retriever_lr={args.retriever_lr}",
            f"train.top_k={args.top_k}",
            f"train.train_generator={str(args.train_generator).lower()}",
            f"train.jsa.num_proposals={args.jsa_proposals}",
            f"train.checkpoint_every={args.steps}",
            f"train.num_workers={args.num_workers}",
            f"train.cpus_per_worker={args.cpus_per_worker}",
            f"train.eval_examples={args.test_examples}",
            f"model.generator={paths['reader']}",
            "model.query_encoder.max_length=64",
            "model.max_source_length=192",
            "model.max_target_length=16",
            f"train.seed={args.seed}",
        ],
    )


def evaluate(cfg, model_dirs: dict | None, decoding: str, examples) -> dict:
    from raggen.index import open_index
    from raggen.models.build import build_models
    from raggen.train.evaluate import evaluate_rag

    models = build_models(cfg.model, cfg.train.estimator, model_dirs)
    for m in models.values():
        m.eval()
    index = open_index(cfg.train.index)
    return evaluate_rag(
        examples,
        query_encoder=models["query_encoder"],
        generator=models["generator"],
        index=index,
        top_k=cfg.train.top_k,
        decoding=decoding,
        ks=(1, 5),
    )


def grad_variance(cfg, state, batches: int, seed: int) -> dict:
    """tr Cov of the query encoder's mini-batch gradient, and relative to the mean's squared norm."""
    from raggen.app.training import train_job
    from raggen.objectives import JSAChainCache
    from raggen.train.batches import BatchSchedule, example_rows
    from raggen.train.loop import setup_worker
    from raggen.train.step import run_step
    from raggen.train.trainer import qa_items

    worker = setup_worker(train_job(cfg), 0, 1, torch.device("cpu"), state)
    worker.train_mode(False)
    params = [p for p in worker.models["query_encoder"].parameters() if p.requires_grad]
    schedule = BatchSchedule(example_rows(qa_items(cfg.train.train_file)), cfg.train.batch_size, seed=seed + 991)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    sq = 0.0
    for m in range(batches):
        for p in worker.params():
            p.grad = None
        rng = torch.Generator().manual_seed(seed + m)
        out = run_step(
            worker.step_models(), worker.index, schedule.batch(m), worker.step_cfg, cache=JSAChainCache(), rng=rng
        )
        out.loss.backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double()
        total += g
        sq += float(g.pow(2).sum())
    mean = total / batches
    var = sq / batches - float(mean.pow(2).sum())
    return {"var": var, "rel": var / max(float(mean.pow(2).sum()), 1e-30)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--estimators", default=",".join(ESTIMATORS))
    p.add_argument("--steps", type=int, default=60, help="training budget, the same for every estimator")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="reader lr")
    p.add_argument("--retriever-lr", type=float, default=2e-5)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--jsa-proposals", type=int, default=8)
    p.add_argument("--train-generator", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--num-entities", type=int, default=300)
    p.add_argument("--test-examples", type=int, default=100)
    p.add_argument(
        "--decoding",
        default=None,
        help="force one decoding for all (default: rag-token for RAG-Token, else rag-sequence-fast)",
    )
    p.add_argument("--grad-batches", type=int, default=8, help="mini-batches per gradient-variance estimate (0 = skip)")
    p.add_argument("--reader", default=None)
    p.add_argument("--pretrain-reader-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=str(int(time.time())), help="run-name suffix (a reused tag resumes those runs)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "raggen-bench-compare"))
    args = p.parse_args(argv)

    import ray

    from raggen.app.training import run_training
    from raggen.train.checkpointing import read_checkpoint
    from raggen.train.evaluate import split_examples

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=max(4, os.cpu_count() or 2), log_to_driver=False
    )  # keep the dashboard: Train V2 needs its State API
    paths = prepare(args, work)
    test = split_examples("test", dev_file=paths["dev"], world_dir=paths["world"], limit=args.test_examples)
    print(f"machine: {machine()}")
    print(
        f"world: {args.num_entities} entities; test: {len(test)} questions; reader: {paths['reader']} ({paths['reader_source']})"
    )
    print(
        f"budget: {args.steps} steps x {args.batch_size} examples x {args.num_workers} worker(s); top-k {args.top_k}; "
        f"lr {args.lr} (reader), {args.retriever_lr} (retrievers); JSA {args.jsa_proposals} proposals"
    )
    rows, start_eval = [], {}
    for estimator in args.estimators.split(","):
        cfg = config_for(paths, estimator, args, work)
        decoding = args.decoding or ("rag-token" if estimator == "rag-token" else "rag-sequence-fast")
        if decoding not in start_eval:
            start_eval[decoding] = evaluate(cfg, None, decoding, test)
        var0 = grad_variance(cfg, None, args.grad_batches, args.seed) if args.grad_batches else None
        t0 = time.time()
        summary = run_training(cfg)
        wall = time.time() - t0
        state = read_checkpoint(summary["final"])
        after = evaluate(cfg, state.model_dirs, decoding, test)
        var1 = grad_variance(cfg, state, args.grad_batches, args.seed) if args.grad_batches else None
        rows.append(
            {
                "estimator": estimator,
                "decoding": decoding,
                "before": start_eval[decoding],
                "after": after,
                "train_s": wall,
                "grad_var_start": var0,
                "grad_var_end": var1,
                "acceptance_rate": summary["metrics"].get("acceptance_rate"),
            }
        )
        print(f"  {estimator}: done in {wall:.0f}s", flush=True)

    print(
        f"\n{'estimator':<13}{'decoding':<19}{'EM':>12}{'F1':>13}{'R@1':>13}{'R@5':>13}{'train s':>9}"
        f"{'gvar start':>12}{'gvar end':>11}{'rel start':>10}{'rel end':>9}"
    )
    for r in rows:
        b, a = r["before"], r["after"]
        pair = lambda k, b=b, a=a: f"{b[k]:.3f}>{a[k]:.3f}"  # noqa: E731
        gv = lambda v, k: f"{v[k]:.3g}" if v else "-"  # noqa: E731
        print(
            f"{r['estimator']:<13}{r['decoding']:<19}{pair('em'):>12}{pair('f1'):>13}{pair('recall@1'):>13}"
            f"{pair('recall@5'):>13}{r['train_s']:>9.0f}{gv(r['grad_var_start'], 'var'):>12}{gv(r['grad_var_end'], 'var'):>11}"
            f"{gv(r['grad_var_start'], 'rel'):>10}{gv(r['grad_var_end'], 'rel'):>9}"
        )
    print(f"\nload avg at end: {os.getloadavg()[0]:.1f}")
    print(json.dumps(rows, default=float))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
