"""Serve under faults: what steady clients see while replicas die, LATEST goes bad, or load exceeds the queues.

Claim measured: the Ingress resends an idempotent model call whose replica died, so killing one
replica of the Retriever, the Reranker or the Generator fails no request; an Ingress replica's own
death fails only the requests in flight on it (Serve's proxy does not resend them), which raggen's
client resends; a corrupt LATEST while the Retriever scales 1 -> 2 fails nothing (both replicas
serve the last good version); load beyond the queues is turned away with 503 + Retry-After at once.

One table: per scenario the requests sent, the failed ones (not 200, 503 counted apart), and the
p50 / p99 latency of the requests started during the fault, each against the no-fault baseline of
the same run (ratio). "During the fault" is from the kill (or the LATEST move) until Serve reports
the replacement replica RUNNING again (or both Retriever replicas serve the fallback).

The app: a MiniLM index of a generated world, the shipped reader (greedy, 8 new tokens), a tiny
cross-encoder reranker, 2 replicas of every deployment with 0.1 CPU each, 4 ongoing + 4 queued
requests per deployment. Loopback only; every client call has a timeout, every stream a request
count and a wall-clock cap.

    .venv/bin/python benchmarks/faults.py                 # ~6-10 min on 2 loaded CPU cores
    .venv/bin/python benchmarks/faults.py --clients 3 --window-requests 12 --out faults.json
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from _common import format_table, machine  # noqa: E402

from raggen.testing import copy_version
from raggen.testing import wait_for as poll

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
READER = str(Path(__file__).resolve().parents[1] / "raggen" / "assets" / "reader")
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = "raggen"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entities", type=int, default=30, help="world size (passages ~ 2 x entities)")
    p.add_argument("--clients", type=int, default=3, help="concurrent clients of the steady stream")
    p.add_argument("--baseline-requests", type=int, default=60, help="requests of the no-fault baseline")
    p.add_argument("--window-requests", type=int, default=12, help="requests after the fault window at least")
    p.add_argument("--burst", type=int, default=48, help="concurrent one-shot requests of the overload scenario")
    p.add_argument("--max-seconds", type=float, default=150.0, help="wall-clock cap per scenario")
    p.add_argument("--work-dir", default=None, help="where the world and index go (default: a temp dir)")
    p.add_argument(
        "--only",
        default="kills,overload,latest",
        help="comma-separated scenario groups: kills, overload, latest (the baseline always runs)",
    )
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p.parse_args()


# ------------------------------------------------------------------------------------ setup


def setup(work: Path, entities: int) -> dict:
    from raggen.corpus.world import WorldConfig, read_changed_facts, write_world
    from raggen.index import IndexBuildSettings, build_index, set_latest
    from raggen.models import make_tiny_reranker
    from raggen.models.retriever import EncoderSpec

    files = write_world(work / "world", WorldConfig(num_entities=entities, seed=1, changed_fraction=0.3))
    root = str(work / "index")
    build_index(
        str(files.passages_v1),
        root,
        encoder=EncoderSpec(name_or_path=MINILM, max_length=128),
        settings=IndexBuildSettings(num_shards=1, num_actors=1, actor_num_cpus=0.5, actor_num_gpus=None),
        version="v1",
        work_dir=work / "build",
    )
    copy_version(root, "v1", "v2", tamper=False)
    set_latest(root, "v2")
    questions = [f.question for f in read_changed_facts(files.changed)][:8]
    return {"root": root, "questions": questions, "reranker": make_tiny_reranker(str(work / "reranker"))}


def deploy(paths: dict, port: int, retriever_replicas: int) -> None:
    from raggen.serve.app import deploy_config, serve_deploy_config

    args = {
        "index": paths["root"],
        "watch_latest": True,
        "watch_interval_s": 0.5,
        "query_encoder": {"name_or_path": MINILM, "pooling": "mean", "max_length": 64},
        "generator": READER,
        "reranker": paths["reranker"],
        "rerank_candidates": 6,
        "max_source_length": 128,
        "max_target_length": 9,
        "num_beams": 1,
        "default_top_k": 3,
        "max_top_k": 5,
        "max_new_tokens": 8,
        "replica_num_cpus": 0.1,
        "ingress_num_cpus": 0.05,
        "max_batch_size": 4,
        "batch_wait_timeout_s": 0.005,
        "max_ongoing_requests": 4,
        "max_queued_requests": 4,
        "retry_after_s": 2,
        "autoscaling": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 2},
        "deployments": {
            "retriever": {"autoscaling": {"min_replicas": retriever_replicas, "max_replicas": retriever_replicas}}
        },
    }
    deploy_config(
        serve_deploy_config(
            args,
            host="127.0.0.1",
            port=port,
            request_timeout_s=60,
            runtime_env={"env_vars": {"RAGGEN_API_TOKEN": TOKEN}},
        )
    )


def running(name: str) -> int:
    from ray import serve

    return int(serve.status().applications[APP].deployments[name].replica_states.get("RUNNING", 0))


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.25):
    """``raggen.testing.wait_for`` with the service's transient errors counted as "not yet"."""
    return poll(
        predicate, timeout_s, what, poll_s=poll_s, retry_on=(httpx.HTTPError, ValueError, KeyError), error=TimeoutError
    )


# ------------------------------------------------------------------------------------ load


class Stream:
    """Clients sending /v1/answer back to back until stopped (bounded by ``max_seconds``);
    each outcome is (start, end, status). ``raggen_client`` sends through raggen.serve.client.ask."""

    def __init__(self, url: str, questions: list[str], clients: int, max_seconds: float, raggen_client=False):
        self.url, self.questions, self.raggen_client = url, questions, raggen_client
        self.deadline = time.monotonic() + max_seconds
        self.results: list[tuple[float, float, int | str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _send(self, http: httpx.Client, question: str) -> int | str:
        from raggen.errors import RaggenError
        from raggen.serve.client import ServiceError, ask

        if not self.raggen_client:
            return http.post("/v1/answer", json={"question": question}).status_code
        try:
            ask(self.url, question, token=TOKEN, client=http, timeout=60)
            return 200
        except ServiceError as exc:
            return exc.status_code
        except RaggenError as exc:
            return type(exc).__name__

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60, headers=AUTH) as http:
            n = i
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                start = time.monotonic()
                try:
                    status = self._send(http, self.questions[n % len(self.questions)])
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                n += 1
                self.results.append((start, time.monotonic(), status))

    def __enter__(self) -> Stream:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def wait_for(self, count: int, timeout_s: float = 90) -> None:
        target = len(self.results) + count
        wait_for(lambda: len(self.results) >= target, timeout_s, f"{count} more answers", poll_s=0.05)


def summary(name: str, results: list, window: tuple[float, float] | None, base: dict | None, note: str) -> dict:
    """One table row: counts over all of ``results``, latencies of those started in ``window``."""
    statuses = [s for _, _, s in results]
    inside = [(e - s) * 1000.0 for s, e, st in results if st == 200 and (window is None or window[0] <= s <= window[1])]
    lat = np.array(inside) if inside else np.array([np.nan])
    failures = sorted({str(s) for s in statuses if s not in (200, 503)})
    if failures:
        note = f"{note}; failures: {', '.join(failures)}"
    row = {
        "scenario": name,
        "requests": len(results),
        "failed": sum(1 for s in statuses if s not in (200, 503)),
        "503": statuses.count(503),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "window_requests": len(inside),
        "note": note,
    }
    if base is not None:
        row["p50_ratio"], row["p99_ratio"] = row["p50_ms"] / base["p50_ms"], row["p99_ms"] / base["p99_ms"]
    return row


# ------------------------------------------------------------------------------------ scenarios


def replica_actor_names(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill_scenario(url: str, paths: dict, args, deployment: str, base: dict, raggen_client: bool = False) -> dict:
    import ray

    wait_for(lambda: running(deployment) == 2, 240, f"2 {deployment} replicas")
    with Stream(url, paths["questions"], args.clients, args.max_seconds, raggen_client) as stream:
        stream.wait_for(2 * args.clients)
        before = replica_actor_names(deployment)
        name = before[0]
        killed = time.monotonic()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        # recovered: Serve started a replica of a new name (it noticed the death) and it is RUNNING
        wait_for(
            lambda: set(replica_actor_names(deployment)) - set(before) and running(deployment) == 2,
            240,
            f"a replacement {deployment} replica",
            poll_s=0.1,
        )
        recovered = time.monotonic()
        stream.wait_for(args.window_requests)
    label = f"kill 1 of 2 {deployment} replicas" + (" (raggen client)" if raggen_client else "")
    return summary(label, stream.results, (killed, recovered), base, f"replaced in {recovered - killed:.0f} s")


def corrupt_latest_scenario(url: str, port: int, paths: dict, args, base: dict) -> dict:
    from raggen.index import set_latest

    root = paths["root"]
    deploy(paths, port, retriever_replicas=1)
    wait_for(lambda: running("Retriever") == 1, 240, "1 Retriever replica")
    with (
        httpx.Client(base_url=url, timeout=30, headers=AUTH) as http,
        Stream(url, paths["questions"], args.clients, args.max_seconds) as stream,
    ):
        stream.wait_for(2 * args.clients)
        copy_version(root, "v2", "v3", tamper=True)
        start = time.monotonic()
        set_latest(root, "v3", verify=False)
        deploy(paths, port, retriever_replicas=2)
        views: dict[str, dict] = {}

        def both_on_fallback() -> bool:
            info = http.get("/v1/index").json()
            views[info["replica"]] = info
            fallback = [(i["version"], i["serving_fallback"]) == ("v2", True) for i in views.values()]
            return len(views) == 2 and all(fallback)

        wait_for(both_on_fallback, 240, "both Retriever replicas on the v2 fallback", poll_s=0.1)
        done = time.monotonic()
        stream.wait_for(args.window_requests)
    versions = sorted({i["version"] for i in views.values()})
    return summary(
        "corrupt LATEST (v3) while Retriever scales 1 -> 2",
        stream.results,
        (start, done),
        base,
        f"both replicas serve {','.join(versions)} (fallback) after {done - start:.0f} s",
    )


def overload_scenario(url: str, paths: dict, args, base: dict) -> dict:
    results: list[tuple[float, float, int | str]] = []
    retry_after: list[str | None] = []

    def one(i: int) -> None:
        start = time.monotonic()
        try:
            with httpx.Client(base_url=url, timeout=60, headers=AUTH) as http:
                r = http.post("/v1/answer", json={"question": paths["questions"][i % len(paths["questions"])]})
                status: int | str = r.status_code
                if r.status_code == 503:
                    retry_after.append(r.headers.get("retry-after"))
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        results.append((start, time.monotonic(), status))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(args.burst)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    refused = [(e - s) * 1000.0 for s, e, st in results if st == 503]
    note = (
        f"{args.burst} at once; 503s answered in <= {max(refused):.0f} ms, Retry-After {sorted(set(retry_after))}"
        if refused
        else f"{args.burst} at once; no 503"
    )
    return summary(f"overload: {args.burst} concurrent (queues 4+4)", results, None, base, note)


def main() -> None:
    args = parse_args()
    import ray
    from ray import serve

    from raggen.serve.app import wait_until_running

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raggen-faults-"))
    # address="local": a Ray of our own, even where another cluster runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.monotonic()
    rows: list[dict] = []
    try:
        paths = setup(work, args.entities)
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        port, _ = port.getsockname()[1], port.close()
        url = f"http://127.0.0.1:{port}"
        deploy(paths, port, retriever_replicas=2)
        wait_until_running(APP, timeout_s=600)
        with httpx.Client(base_url=url, timeout=60, headers=AUTH) as http:
            for q in paths["questions"][:4]:  # warm-up
                http.post("/v1/answer", json={"question": q}).raise_for_status()
        print("measuring the no-fault baseline", flush=True)
        with Stream(url, paths["questions"], args.clients, args.max_seconds) as stream:
            stream.wait_for(args.baseline_requests, timeout_s=args.max_seconds)
        base = summary("no fault (baseline)", stream.results, None, None, f"{args.clients} clients back to back")
        rows.append({**base, "p50_ratio": 1.0, "p99_ratio": 1.0})
        only = set(args.only.split(","))
        if "kills" in only:
            for deployment in ("Retriever", "Reranker", "Generator", "Ingress"):
                print(f"killing a {deployment} replica", flush=True)
                rows.append(kill_scenario(url, paths, args, deployment, base))
            print("killing an Ingress replica, clients through raggen.serve.client", flush=True)
            rows.append(kill_scenario(url, paths, args, "Ingress", base, raggen_client=True))
        if "overload" in only:
            print("overload", flush=True)
            rows.append(overload_scenario(url, paths, args, base))
        if "latest" in only:
            print("corrupt LATEST while scaling", flush=True)
            rows.append(corrupt_latest_scenario(url, port, paths, args, base))
    finally:
        serve.shutdown()
        ray.shutdown()
    headers = ["scenario", "requests", "failed", "503", "p50 ms (x base)", "p99 ms (x base)", "notes"]
    table = [
        [
            r["scenario"],
            r["requests"],
            r["failed"],
            r["503"],
            f"{r['p50_ms']:.0f} ({r['p50_ratio']:.2f}x)",
            f"{r['p99_ms']:.0f} ({r['p99_ratio']:.2f}x)",
            r["note"],
        ]
        for r in rows
    ]
    print()
    print(machine())
    print(
        f"whole run {time.monotonic() - t0:.0f} s; {args.clients} clients; latency of the 200s started during "
        f"the fault window (kill -> replacement RUNNING), against the no-fault baseline of this run"
    )
    print(format_table(headers, table))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
