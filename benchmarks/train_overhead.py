"""Claim: the Ray Train loop costs at most 1.1x the step time of a plain single-process torch loop
doing the same work (target <= 1.1x).

Same work on both sides: the same models (MiniLM query encoder + the reader), the same published
index (built once with the Ray Data pipeline), the same batches and estimator step
(``raggen.train.loop.setup_worker`` + ``train_step``), the same threads (torch ``--threads``, and
``OMP_NUM_THREADS=1`` as Ray gives a 1-CPU worker, which is what faiss's OpenMP reads). The plain
loop runs in a fresh subprocess (not the driver, which hosts Ray's client threads) and times each
``train_step``. The Ray side is ``TorchTrainer`` with one worker
(``raggen.train.trainer.make_trainer``), timed from the wall-clock gaps between consecutive JSONL
records (so metric averaging, the JSONL line and reports count), run twice: reporting only with
checkpoints (the default) and ``ray.train.report`` every step (in Train V2 each report is a
cross-worker barrier through an actor). Warm-up steps and the final (checkpointing) step are
excluded.

Shared machines: other processes' load only ever adds time, so each loop runs ``--repeats`` times
(interleaved) and every step index keeps its fastest time over the repeats; the table compares the
sums of those per-step minima (same step indices, same batches). ``(a)`` is the in-run ratio of
wall time to the step's own compute (what the loop adds, independent of load). ``--threads 1`` by
default: with 2 torch threads on 2 busy cores OpenMP spin-waits inflate times erratically.

    .venv/bin/python benchmarks/train_overhead.py --estimators rag-sequence,jsa --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}"


def prepare(work: Path, num_entities: int, generator: str | None) -> dict:
    """World -> index (Ray Data + MiniLM) -> reader; returns paths. Cached in ``work``."""
    from raggen.corpus.world import WorldConfig, write_world
    from raggen.index import IndexBuildSettings, build_index
    from raggen.models import MINILM_ID, make_tiny_generator
    from raggen.models.retriever import EncoderSpec

    files = write_world(work / "world", WorldConfig(num_entities=num_entities, seed=0))
    index = work / "index"
    if not (index / "LATEST").exists():
        build_index(
            str(files.passages_v1),
            str(index),
            encoder=EncoderSpec(name_or_path=MINILM_ID, max_length=128),
            settings=IndexBuildSettings(num_shards=2, actor_num_cpus=1.0, actor_num_gpus=None),
        )
    if generator is None:
        shipped = [
            p for p in (ROOT / "artifacts/models/reader", ROOT / "raggen/assets/reader") if (p / "config.json").exists()
        ]
        generator = str(shipped[0]) if shipped else make_tiny_generator(str(work / "reader"), size="reader")
    return {"train": str(files.train_jsonl), "index": str(index), "generator": generator}


def loop_config(paths: dict, estimator: str, args, metrics_path: str | None, *overrides: str):
    from raggen.app.training import train_job
    from raggen.config import load_config

    cfg = load_config(
        None,
        [
            f"train.estimator={estimator}",
            f"train.index={paths['index']}",
            f"model.generator={paths['generator']}",
            f"train.batch_size={args.batch_size}",
            f"train.steps={args.steps}",
            f"train.top_k={args.top_k}",
            f"train.checkpoint_every={args.steps + 1}",
            "train.lr=1e-4",
            "model.query_encoder.max_length=64",
            "model.max_source_length=160",
            "model.max_target_length=16",
            *overrides,
        ],
    )
    return train_job(cfg, metrics_path=metrics_path).replace(num_threads=args.threads)


def plain_loop(paths: dict, estimator: str, args) -> dict[int, dict]:
    """{step: seconds} of the bare loop (run in this process; see ``plain_loop_subprocess``)."""
    from raggen.train.batches import BatchSchedule, example_rows
    from raggen.train.loop import setup_worker, train_step
    from raggen.train.trainer import qa_items

    torch.set_num_threads(args.threads)
    worker = setup_worker(loop_config(paths, estimator, args, None), 0, 1, torch.device("cpu"), None)
    schedule = BatchSchedule(example_rows(qa_items(paths["train"])), args.batch_size, seed=0)
    rows = {}
    for step in range(args.steps):
        t0 = time.perf_counter()
        train_step(worker, schedule.batch(step), step)
        rows[step + 1] = {"wall": time.perf_counter() - t0, "compute": time.perf_counter() - t0}
    return rows


def plain_loop_subprocess(paths: dict, estimator: str, args) -> dict[int, dict]:
    """The plain loop in a fresh process with a Ray worker's thread environment."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        __file__,
        "--plain-only",
        json.dumps(paths),
        "--estimators",
        estimator,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--top-k",
        str(args.top_k),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def ray_loop(paths: dict, estimator: str, args, workers: int, work: Path, report_every: int = 0) -> dict[int, dict]:
    """{step: wall gap since the previous JSONL record, and the step's compute seconds}."""
    from raggen.train.metrics import read_metrics
    from raggen.train.trainer import make_trainer, qa_items

    name = f"overhead-{estimator}-{workers}w-r{report_every}-{int(time.time())}"
    metrics_path = str(work / "runs" / name / "metrics.jsonl")
    job = loop_config(paths, estimator, args, metrics_path, f"train.report_every={report_every}")
    trainer = make_trainer(
        job,
        qa_items(paths["train"]),
        name=name,
        storage_path=str(work / "runs"),
        num_workers=workers,
        cpus_per_worker=1.0,
    )
    trainer.fit()
    steps, _ = read_metrics(metrics_path)
    return {b["step"]: {"wall": b["time"] - a["time"], "compute": b["step_time_s"]} for a, b in zip(steps, steps[1:])}


def combine(repeats: list[dict[int, dict]], args) -> dict[str, float]:
    """Per step index (warm-up and last step excluded) the fastest wall time over the repeats,
    summed; and the median in-run wall/compute ratio."""
    window = range(args.warmup + 1, args.steps)
    best = [min(r[i]["wall"] for r in repeats) for i in window]
    ratios = [r[i]["wall"] / r[i]["compute"] for r in repeats for i in window]
    return {
        "s_per_step": sum(best) / len(best),
        "loop_ratio": statistics.median(ratios),
        "median_wall": statistics.median(r[i]["wall"] for r in repeats for i in window),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--estimators", default="rag-sequence,jsa")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--repeats", type=int, default=3, help="runs of each loop; each step keeps its fastest")
    p.add_argument("--num-entities", type=int, default=100)
    p.add_argument(
        "--generator", default=None, help="reader folder (default: the shipped reader, else a fresh reader-size one)"
    )
    p.add_argument("--two-workers", action="store_true", help="also time a 2-worker DDP run")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "raggen-bench-overhead"))
    p.add_argument("--plain-only", default=None, help=argparse.SUPPRESS)  # internal: the subprocess side
    args = p.parse_args(argv)
    if args.steps < args.warmup + 3:
        p.error("--steps must exceed --warmup by at least 3")
    if args.plain_only:
        print(json.dumps(plain_loop(json.loads(args.plain_only), args.estimators, args)))
        return 0

    import ray

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=max(4, os.cpu_count() or 2), log_to_driver=False
    )  # keep the dashboard: Train V2 needs its State API
    paths = prepare(work, args.num_entities, args.generator)
    print(f"machine: {machine()}")
    print(
        f"setup: batch {args.batch_size}/worker, top-k {args.top_k}, {args.threads} torch threads, "
        f"{args.steps} steps ({args.warmup} warm-up and the last excluded), reader {paths['generator']}"
    )
    loops = {
        "plain torch loop (1 process)": lambda e: plain_loop_subprocess(paths, e, args),
        "Ray Train 1 worker, report w/ ckpt": lambda e: ray_loop(paths, e, args, 1, work),
        "Ray Train 1 worker, report each step": lambda e: ray_loop(paths, e, args, 1, work, report_every=1),
    }
    if args.two_workers:
        loops["Ray Train 2 workers DDP (2x batch)"] = lambda e: ray_loop(paths, e, args, 2, work)
    out, loads = [], []
    for estimator in args.estimators.split(","):
        runs: dict[str, list] = {name: [] for name in loops}
        for _ in range(args.repeats):  # interleaved, so load swings hit every loop alike
            for name, fn in loops.items():
                runs[name].append(fn(estimator))
                loads.append(os.getloadavg()[0])
        plain = combine(runs["plain torch loop (1 process)"], args)
        for name in loops:
            r = combine(runs[name], args)
            out.append({"estimator": estimator, "loop": name, **r, "vs_plain": r["s_per_step"] / plain["s_per_step"]})
    print(
        f"\nload avg during the runs: {min(loads):.1f} to {max(loads):.1f} ({args.repeats} interleaved repeats, per-step minima)"
    )
    print(f"\n{'estimator':<13}{'loop':<38}{'s/step':>8}{'vs plain':>10}{'(a) wall/compute':>18}{'median s/step':>15}")
    for r in out:
        print(
            f"{r['estimator']:<13}{r['loop']:<38}{r['s_per_step']:>8.3f}{r['vs_plain']:>9.3f}x{r['loop_ratio']:>17.3f}x"
            f"{r['median_wall']:>15.3f}"
        )
    print(json.dumps({"rows": out, "load": [min(loads), max(loads)]}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
