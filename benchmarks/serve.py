"""Serve latency and throughput: the Ray Serve graph over loopback HTTP vs the same pipeline in-process.

Claim measured: what the Serve graph (HTTP proxy -> Ingress -> Retriever -> Generator, each a
separate replica process) costs on top of calling the same stage functions in one process, and
what ``@serve.batch`` buys under concurrent load. One table: p50 / p99 latency and requests/s at
several client concurrencies for

* ``in-process``: ``retrieve_batch`` + ``generate_batch`` called directly (the same-run baseline),
  one request at a time per client thread;
* ``serve`` with batching on (``max_batch_size`` requests per model call) and off (``max_batch_size=1``).

Bounded loopback load only: a fixed number of requests per level, a wall-clock cap per level.
Every model process runs torch with one intra-op thread (what Ray gives a fractional-CPU
replica), so the in-process baseline gets the same.

    .venv/bin/python benchmarks/serve.py                     # ~3-5 min on 2 CPU cores
    .venv/bin/python benchmarks/serve.py --concurrency 1,4,8,16 --requests 64 --generator raggen/assets/reader
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entities", type=int, default=150, help="world size (passages ~ 2 x entities)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least 4 x concurrency)")
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated client concurrencies")
    p.add_argument("--max-seconds", type=float, default=90.0, help="wall-clock cap per level")
    p.add_argument("--generator", default=None, help="reader checkpoint (default: a random ~10M BART reader)")
    p.add_argument(
        "--decoding", default="rag-token", choices=["rag-token", "rag-sequence-fast", "rag-sequence-thorough"]
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--work-dir", default=None, help="where the world, index and reader go (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p.parse_args()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import ray

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), {gpu}; "
        f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}"
    )


def setup(work: Path, args: argparse.Namespace) -> dict:
    """World -> index (Ray Data build) -> reader; returns paths and the benchmark questions."""
    from raggen.corpus.qa import read_qa
    from raggen.corpus.world import WorldConfig, write_world
    from raggen.index import IndexBuildSettings, build_index, read_latest
    from raggen.models import make_tiny_generator
    from raggen.models.retriever import EncoderSpec

    files = write_world(work / "world", WorldConfig(num_entities=args.entities, seed=0))
    root = str(work / "index")
    if read_latest(root) is None:
        build_index(
            str(files.passages_v1),
            root,
            encoder=EncoderSpec(name_or_path=MINILM, max_length=128),
            settings=IndexBuildSettings(num_shards=2, actor_num_cpus=1.0, actor_num_gpus=None),
            version="v1",
        )
    generator = args.generator
    if generator is None:
        generator = str(work / "reader")
        if not Path(generator, "config.json").exists():
            make_tiny_generator(generator, size="reader")
    questions = [ex.question for ex in read_qa(files.test_jsonl)] or ["Where does the miller live?"]
    return {"root": root, "generator": generator, "questions": questions}


def app_args(paths: dict, args: argparse.Namespace, max_batch_size: int) -> dict:
    return {
        "index": paths["root"],
        "index_version": "v1",
        "query_encoder": {"name_or_path": MINILM, "pooling": "mean", "max_length": 64},
        "generator": paths["generator"],
        "max_source_length": 192,
        "max_target_length": args.max_new_tokens + 1,
        "num_beams": args.num_beams,
        "default_top_k": args.top_k,
        "max_top_k": max(args.top_k, 20),
        "max_new_tokens": args.max_new_tokens,
        "replica_num_cpus": 0.25,
        "ingress_num_cpus": 0.1,
        "max_batch_size": max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_ms / 1000.0,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2},
    }


def run_level(call, questions: list[str], concurrency: int, n: int, max_seconds: float) -> dict:
    """``n`` calls over ``concurrency`` threads (or until ``max_seconds``): latencies and throughput."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    counter = iter(range(n))

    def worker(_: int) -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                call(questions[i % len(questions)])
            except Exception:  # noqa: BLE001 - counted and reported, not fatal to the run
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append((time.perf_counter() - start) * 1000.0)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors[0],
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "req_per_s": len(latencies) / wall if wall > 0 else float("nan"),
    }


def in_process_rows(paths: dict, args: argparse.Namespace, levels: list[int]) -> list[dict]:
    from raggen.models import Generator, TextEncoder
    from raggen.serve.deployments import generate_batch, load_live_index, retrieve_batch

    torch.set_num_threads(1)
    encoder = TextEncoder.from_pretrained(MINILM, pooling="mean", max_length=64).eval()
    live = load_live_index(paths["root"], "v1", expect_dim=encoder.dim)
    generator = Generator.from_pretrained(
        paths["generator"], max_source_length=192, max_target_length=args.max_new_tokens + 1
    ).eval()
    lock = threading.Lock()  # one model call at a time, as one replica's batch loop does

    def call(question: str) -> str:
        with lock:
            hits = retrieve_batch(encoder, live, [question], [args.top_k])
            return generate_batch(generator, [question], hits, [args.decoding], [args.max_new_tokens], args.num_beams)[
                0
            ]

    for q in paths["questions"][:3]:  # warm-up
        call(q)
    rows = []
    for c in levels:
        row = run_level(call, paths["questions"], c, max(args.requests, 4 * c), args.max_seconds)
        rows.append({"pipeline": "in-process", "batching": "-", **row})
        print(f"  in-process c={c}: p50 {row['p50_ms']:.1f} ms", flush=True)
    return rows, call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_rows(paths: dict, args: argparse.Namespace, levels: list[int], max_batch_size: int) -> list[dict]:
    from ray import serve

    from raggen.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(paths, args, max_batch_size)), name="raggen", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/answer"
    label = f"on ({max_batch_size}, {args.batch_wait_ms:g} ms)" if max_batch_size > 1 else "off (1)"
    local = threading.local()

    def call(question: str) -> str:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=120)
        r = local.http.post(
            url,
            json={
                "question": question,
                "top_k": args.top_k,
                "decoding": args.decoding,
                "max_new_tokens": args.max_new_tokens,
            },
        )
        r.raise_for_status()
        return r.json()["answer"]

    for q in paths["questions"][:3]:  # warm-up: first calls load lazily initialised kernels
        call(q)
    rows = []
    try:
        for c in levels:
            row = run_level(call, paths["questions"], c, max(args.requests, 4 * c), args.max_seconds)
            rows.append({"pipeline": "serve", "batching": label, **row})
            print(f"  serve batching {label} c={c}: p50 {row['p50_ms']:.1f} ms", flush=True)
    finally:
        serve.shutdown()
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print()
    print(header)
    print(
        f"| {'pipeline':<10} | {'batching':<14} | {'conc.':>5} | {'requests':>8} | {'errors':>6} | "
        f"{'p50 ms':>8} | {'p99 ms':>8} | {'req/s':>6} |"
    )
    print(f"|{'-' * 12}|{'-' * 16}|{'-' * 7}|{'-' * 10}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    for r in rows:
        print(
            f"| {r['pipeline']:<10} | {r['batching']:<14} | {r['concurrency']:>5} | {r['requests']:>8} | "
            f"{r['errors']:>6} | {r['p50_ms']:>8.1f} | {r['p99_ms']:>8.1f} | {r['req_per_s']:>6.2f} |"
        )
    base = [r["p50_ms"] for r in rows if r["pipeline"] == "in-process" and r["concurrency"] == 1]
    if not base:
        return
    baseline = statistics.mean(base)  # before and after the Serve runs
    for r in rows:
        if r["pipeline"] == "serve" and r["concurrency"] == 1:
            print(
                f"Serve overhead at concurrency 1, batching {r['batching']}: {r['p50_ms'] - baseline:+.1f} ms p50 "
                f"({r['p50_ms']:.1f} vs in-process {' / '.join(f'{b:.1f}' for b in base)})"
            )


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raggen-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        paths = setup(work, args)
        from raggen.index import read_manifest

        manifest = read_manifest(paths["root"], "v1")
        rows, local_call = in_process_rows(paths, args, levels)
        rows += serve_rows(paths, args, levels, args.max_batch_size)
        rows += serve_rows(paths, args, levels, 1)
        # the baseline again, after the Serve runs: how much the machine itself drifted meanwhile
        again = run_level(local_call, paths["questions"], 1, args.requests, args.max_seconds)
        rows.append({"pipeline": "in-process", "batching": "- (again)", **again})
    finally:
        ray.shutdown()
    reader = "random ~10M BART reader" if args.generator is None else args.generator
    header = (
        f"machine: {machine()}\n"
        f"workload: {manifest.num_passages} passages in {len(manifest.shards)} Flat shards, MiniLM-L6 queries, "
        f"{reader}, {args.decoding}, beams {args.num_beams}, top_k {args.top_k}, max_new_tokens "
        f"{args.max_new_tokens}; loopback HTTP; one torch thread per model process"
    )
    print_table(rows, header)
    if args.out:
        Path(args.out).write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
