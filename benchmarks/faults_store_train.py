"""Index store and training under faults: killed publishers, racing publishers, flipped bytes, a dead worker.

Claims measured (the same ones tests/integration/test_index_safety.py and test_train_ray.py check):

- store: a publisher killed with SIGKILL mid-upload (local folder root, and an S3 root on a moto
  server on loopback) leaves only complete versions (each verifies) and a valid LATEST; a rerun
  takes the dead publisher's claim over and finishes. N publishers of one version name at once:
  exactly one wins, the others are refused, LATEST never moves back. A byte flipped in an S3
  object after a first verify: ``verify`` refuses, naming the file (the local cache does not hide it).
- train: a Ray Train worker killed mid-run (raggen's ``inject_failure`` hook, ``max_failures=1``)
  and the run finishes from its last checkpoint.

One table: per scenario the trials, the outcome counts, the time per trial, and the same operation
without the fault (baseline) as a ratio. Loopback only; nothing leaves the machine.

    .venv/bin/python benchmarks/faults_store_train.py                  # ~2-4 min on 2 CPU cores
    .venv/bin/python benchmarks/faults_store_train.py --groups store --trials 5 --out store.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from _common import format_table, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# a publisher in its own process, so that it can be killed with SIGKILL mid-upload
PUBLISHER = """
import json, sys
from raggen.index.manifest import Manifest, publish_version
root, local, manifest, options = sys.argv[1:5]
publish_version(root, Manifest.model_validate_json(open(manifest).read()), local,
                s3_options=json.loads(options) or None)
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", default="store,train", help="comma-separated scenario groups: store, train")
    p.add_argument("--trials", type=int, default=3, help="trials of each store scenario")
    p.add_argument("--publishers", type=int, default=4, help="concurrent publishers of one version name")
    p.add_argument("--big-rows", type=int, default=30_000, help="vectors (64-d) of the version killed mid-upload")
    p.add_argument("--train-steps", type=int, default=4, help="steps of each training run (killed at step 3)")
    p.add_argument("--work-dir", default=None, help="where everything goes (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p.parse_args()


def ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


# ------------------------------------------------------------------------------------ store: fixtures


class MotoS3:
    """A moto S3 server on 127.0.0.1 (boto3 and pyarrow talk HTTP to it); ``bucket()`` makes a fresh one.

    S3 checks a conditional PUT and stores the object in one step; moto's server checks, then
    stores, in two, so that two threads can both pass the check. Serialising moto's PutObject
    handler gives the emulator S3's guarantee (raggen and boto3 are untouched)."""

    def __enter__(self) -> MotoS3:
        import logging

        from moto.s3.responses import S3Response
        from moto.server import ThreadedMotoServer

        self._original, lock = S3Response.put_object, threading.Lock()
        original = self._original

        def put_object(self):
            with lock:
                return original(self)

        S3Response.put_object = put_object
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.options = {
            "endpoint_url": f"http://{host}:{port}",
            "region_name": "us-east-1",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "max_attempts": 2,
        }
        return self

    def bucket(self) -> str:
        from raggen.storage import s3_client

        name = f"raggen-{uuid.uuid4().hex[:12]}"
        s3_client(self.options).create_bucket(Bucket=name)
        return name

    def __exit__(self, *exc) -> None:
        from moto.s3.responses import S3Response

        self.server.stop()
        S3Response.put_object = self._original


def make_version(out: Path, version: str, *, n: int = 40, d: int = 8, seed: int = 0, created: str | None = None):
    """Two Flat shards of random vectors written to ``out``; returns their manifest."""
    from raggen.index import manifest as M
    from raggen.index import shard as S
    from raggen.index.passage_table import passages_table, write_parquet_atomic

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    files = []
    for s, rows in enumerate(np.array_split(np.arange(n), 2)):
        ids = (np.int64(s) << 40) + np.arange(len(rows), dtype=np.int64)
        index_name, passages_name = M.shard_file_names(s)
        S.write_index_file(S.build_shard_index(xb[rows], ids), out / index_name)
        table = passages_table(
            ids, [f"{seed}-{r}" for r in rows], [""] * len(rows), [f"text {r}" for r in rows], xb[rows]
        )
        write_parquet_atomic(table, out / passages_name)
        files.append((out / index_name, out / passages_name, len(rows)))
    m = M.make_manifest(
        version, encoder_name_or_path="e", pooling="mean", dim=d, metric="ip", faiss_factory="Flat", shard_files=files
    )
    return m.model_copy(update={"created": created}) if created else m


def new_root(kind: str, work: Path, s3: MotoS3) -> tuple[str, dict | None]:
    if kind == "local":
        return str(work / f"root-{uuid.uuid4().hex[:8]}"), None
    return f"s3://{s3.bucket()}/index", s3.options


def seed_root(root: str, options, work: Path) -> None:
    """v0, published (an old ``created``): what LATEST names before each trial."""
    from raggen.index.publish import publish_version

    local = work / "v0"
    m = make_version(local, "v0", created="2026-01-01T00:00:00Z")
    publish_version(root, m, local, s3_options=options)


def all_verify(root: str, options, cache: Path) -> bool:
    from raggen.index.latest import list_versions, read_latest
    from raggen.index.loading import verify_version

    try:
        for version in list_versions(root, options):
            verify_version(root, version, s3_options=options, cache_dir=cache)
        latest = read_latest(root, options)
        return latest is not None and verify_version(root, s3_options=options, cache_dir=cache).version == latest
    except Exception:  # noqa: BLE001 - any failure is a "no" in the table
        return False


# ------------------------------------------------------------------------------------ store: scenarios


def killed_publisher(kind: str, work: Path, s3: MotoS3, big: tuple[Path, object], trials: int) -> dict:
    """SIGKILL a publisher once it has claimed the version (uploads under way), then rerun it."""
    from raggen.index import manifest as M
    from raggen.index.latest import list_versions, read_latest
    from raggen.index.publish import publish_version
    from raggen.storage import open_store

    local, manifest = big
    mfile = work / "big-manifest.json"
    mfile.write_text(manifest.to_json())
    base_s, rerun_s, killed_after = [], [], []
    counts = {"killed": 0, "only_complete": 0, "latest_valid": 0, "rerun_ok": 0}
    for t in range(trials):
        # baseline: the same publish, not killed, to a fresh root of the same kind
        root, options = new_root(kind, work, s3)
        seed_root(root, options, work)
        start = time.monotonic()
        publish_version(root, manifest, local, s3_options=options)
        base_s.append(time.monotonic() - start)

        root, options = new_root(kind, work, s3)
        seed_root(root, options, work)
        cmd = [sys.executable, "-c", PUBLISHER, root, str(local), str(mfile), json.dumps(options or {})]
        store = open_store(root, options)
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while not store.exists(f"{manifest.version}/{M.CLAIM_NAME}"):  # claimed: uploads start
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the publisher never claimed its version")
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            killed_after.append(time.monotonic() - start)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        counts["killed"] += proc.returncode == -signal.SIGKILL
        after_kill = list_versions(root, options) == ["v0"] and not store.exists(
            f"{manifest.version}/{M.MANIFEST_NAME}"
        )
        latest_ok = read_latest(root, options) == "v0" and all_verify(root, options, work / f"cache-{kind}-{t}a")
        start = time.monotonic()
        publish_version(root, manifest, local, s3_options=options)  # takes the dead one's claim over
        rerun_s.append(time.monotonic() - start)
        versions = list_versions(root, options)
        complete = versions == sorted(["v0", manifest.version]) and all_verify(
            root, options, work / f"cache-{kind}-{t}b"
        )
        counts["only_complete"] += after_kill and complete
        counts["latest_valid"] += latest_ok and read_latest(root, options) == manifest.version
        counts["rerun_ok"] += not store.exists(f"{manifest.version}/{M.CLAIM_NAME}")
    size_mb = sum(Path(local, s.index).stat().st_size + Path(local, s.passages).stat().st_size for s in manifest.shards)
    return {
        "scenario": f"kill -9 publisher mid-upload, rerun ({kind} root)",
        "trials": trials,
        "outcome": (
            f"{counts['killed']} killed; versions complete {counts['only_complete']}/{trials}, "
            f"LATEST valid {counts['latest_valid']}/{trials}, claim taken over {counts['rerun_ok']}/{trials}"
        ),
        "time_ms": ms(rerun_s),
        "base_ms": ms(base_s),
        "note": f"{size_mb / 1e6:.0f} MB version, killed at its claim, {ms(killed_after):.0f} ms after its start; time = the rerun's publish "
        "vs the same publish to a fresh root",
        "ok": counts["only_complete"] == counts["latest_valid"] == counts["rerun_ok"] == counts["killed"] == trials,
    }


def concurrent_publishers(kind: str, work: Path, s3: MotoS3, n: int, trials: int) -> dict:
    """``n`` threads publish one version name (different contents) at once; a reader polls LATEST."""
    from raggen.errors import ConfigError
    from raggen.index import manifest as M
    from raggen.index.latest import list_versions, read_latest
    from raggen.index.loading import verify_version
    from raggen.index.publish import publish_version

    contents = [
        make_version(work / f"same-{i}", "v-same", seed=10 + i, n=3000, created="2026-02-01T00:00:00Z")
        for i in range(n)
    ]
    newer = make_version(work / "v9", "v9", seed=9, created="2026-03-01T00:00:00Z")
    base_s, race_s = [], []
    counts = {"one_winner": 0, "refused": 0, "verifies": 0, "never_back": 0}
    for _ in range(trials):
        root, options = new_root(kind, work, s3)
        seed_root(root, options, work)
        start = time.monotonic()
        publish_version(root, contents[0], work / "same-0", s3_options=options)
        base_s.append(time.monotonic() - start)

        root, options = new_root(kind, work, s3)
        seed_root(root, options, work)
        seen, stop = [], threading.Event()

        def watch(root=root, options=options, seen=seen, stop=stop) -> None:
            while not stop.is_set():
                seen.append(read_latest(root, options))
                time.sleep(0.002)

        results: list = [None] * (n + 1)
        barrier = threading.Barrier(n + 1)

        def publish(i: int, root=root, options=options, results=results, barrier=barrier) -> None:
            m, local = (contents[i], work / f"same-{i}") if i < n else (newer, work / "v9")
            barrier.wait()
            try:
                results[i] = publish_version(root, m, local, s3_options=options)
            except Exception as exc:  # noqa: BLE001 - counted below
                results[i] = exc

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # the n racers for "v-same", plus one publisher of a newer v9 racing them
        threads = [threading.Thread(target=publish, args=(i,), daemon=True) for i in range(n + 1)]
        start = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        race_s.append(time.monotonic() - start)
        stop.set()
        watcher.join(30)
        same = results[:n]
        won = [r for r in same if isinstance(r, M.Manifest)]
        lost = [r for r in same if isinstance(r, ConfigError) and "'v-same'" in str(r)]
        counts["one_winner"] += len(won) == 1 and list_versions(root, options) == ["v-same", "v0", "v9"]
        counts["refused"] += len(lost) == n - 1
        try:
            counts["verifies"] += (
                bool(won)
                and verify_version(root, "v-same", s3_options=options, cache_dir=work / "race-cache") == won[0]
            )
        except Exception:  # noqa: BLE001
            pass
        order = [{"v0": 0, "v-same": 1, "v9": 2}[v] for v in seen if v]
        counts["never_back"] += order == sorted(order) and read_latest(root, options) == "v9"
    return {
        "scenario": f"{n} publishers of one version name at once (+1 newer) ({kind} root)",
        "trials": trials,
        "outcome": (
            f"one version per name {counts['one_winner']}/{trials}, other {n - 1} refused {counts['refused']}/{trials}, "
            f"winner verifies {counts['verifies']}/{trials}, LATEST never back {counts['never_back']}/{trials}"
        ),
        "time_ms": ms(race_s),
        "base_ms": ms(base_s),
        "note": f"time = all {n + 1} publishes vs 1 publisher alone",
        "ok": all(v == trials for v in counts.values()),
    }


def flipped_byte(work: Path, s3: MotoS3, trials: int) -> dict:
    """Verify (filling the cache), flip one byte of a stored shard on S3, verify again."""
    from raggen.errors import IndexIntegrityError
    from raggen.index.loading import verify_version
    from raggen.index.publish import publish_version
    from raggen.storage import s3_client

    client = s3_client(s3.options)
    base_s, refuse_s = [], []
    counts = {"refused": 0, "named": 0}
    for t in range(trials):
        bucket = s3.bucket()
        root = f"s3://{bucket}/index"
        local = work / "flip"
        publish_version(root, make_version(local, "v1", n=3000, d=64, seed=t), local, s3_options=s3.options)
        cache = work / f"flip-cache-{t}"
        start = time.monotonic()
        verify_version(root, s3_options=s3.options, cache_dir=cache)
        base_s.append(time.monotonic() - start)
        name = f"shard-0000{t % 2}.{'faiss' if t % 2 == 0 else 'parquet'}"
        key = f"index/v1/{name}"
        body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        body[len(body) // 2] ^= 0x01
        client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
        start = time.monotonic()
        try:
            verify_version(root, s3_options=s3.options, cache_dir=cache)
        except IndexIntegrityError as exc:
            counts["refused"] += 1
            counts["named"] += f"s3://{bucket}/{key}" in str(exc) and "sha256 mismatch" in str(exc)
        refuse_s.append(time.monotonic() - start)
    return {
        "scenario": "1 byte flipped in an S3 object, then verify (warm cache)",
        "trials": trials,
        "outcome": f"refused {counts['refused']}/{trials}, naming the s3:// file {counts['named']}/{trials}",
        "time_ms": ms(refuse_s),
        "base_ms": ms(base_s),
        "note": "flips alternate .faiss / .parquet; time = the refusing verify (it stops at the bad file) vs the first, passing one",
        "ok": counts["refused"] == counts["named"] == trials,
    }


def store_rows(work: Path, args) -> list[dict]:
    rows = []
    with MotoS3() as s3:
        big = (work / "big", make_version(work / "big", "v-big", n=args.big_rows, d=64, seed=7))
        for kind in ("local", "s3"):
            print(f"store: kill -9 mid-publish ({kind})", flush=True)
            rows.append(killed_publisher(kind, work, s3, big, args.trials))
        for kind in ("local", "s3"):
            print(f"store: {args.publishers} concurrent publishers ({kind})", flush=True)
            rows.append(concurrent_publishers(kind, work, s3, args.publishers, args.trials))
        print("store: flipped byte on S3", flush=True)
        rows.append(flipped_byte(work, s3, args.trials))
    return rows


# ------------------------------------------------------------------------------------ train


def publish_tiny_index(passages, encoder_dir: str, out_uri: str, work: Path, num_shards: int = 2) -> None:
    """Encode passages with the tiny encoder and publish a 2-shard Flat index (no Ray Data)."""
    from raggen.index import build_shard_index, make_manifest, passages_table, publish_version, write_parquet_atomic
    from raggen.index.shard import write_index_file
    from raggen.models import TextEncoder, passage_text

    enc = TextEncoder.from_pretrained(encoder_dir, max_length=64)
    xb = enc.encode([passage_text(t, x) for t, x in zip(passages["title"], passages["text"])]).numpy()
    files = []
    work.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        rows = np.arange(shard, len(passages), num_shards)
        index = build_shard_index(xb[rows], rows.astype(np.int64), factory="Flat", metric="ip")
        ipath, ppath = work / f"shard-{shard:05d}.faiss", work / f"shard-{shard:05d}.parquet"
        write_index_file(index, ipath)
        sub = passages.iloc[rows]
        table = passages_table(rows, sub["id"].tolist(), sub["title"].tolist(), sub["text"].tolist(), xb[rows])
        write_parquet_atomic(table, ppath)
        files.append((ipath, ppath, len(rows)))
    manifest = make_manifest(
        "v1", encoder_name_or_path=encoder_dir, pooling="mean", dim=xb.shape[1], metric="ip", faiss_factory="Flat",
        shard_files=files,
    )  # fmt: skip
    publish_version(out_uri, manifest, work)


def train_rows(work: Path, args) -> list[dict]:
    import ray

    from raggen.app.training import run_training
    from raggen.config import load_config
    from raggen.corpus import read_passages, write_qa_jsonl
    from raggen.corpus.world import WorldConfig, build_world, write_world
    from raggen.models import make_tiny_encoder, make_tiny_generator, make_tiny_reranker
    from raggen.train.job import FailureInjection
    from raggen.train.metrics import read_metrics
    from raggen.train.trainer import local_metrics_path

    print("train: tiny world, models and index", flush=True)
    files = write_world(work / "world", WorldConfig(num_entities=30, seed=0))
    world = build_world(WorldConfig(num_entities=30, seed=0))
    train_file = write_qa_jsonl(work / "train-small.jsonl", world.train[:48])
    models = {
        "encoder": make_tiny_encoder(str(work / "enc")),
        "generator": make_tiny_generator(str(work / "gen")),
        "reranker": make_tiny_reranker(str(work / "rr")),
    }
    publish_tiny_index(read_passages(files.passages_v1), models["encoder"], str(work / "index"), work / "index-work")

    def config(name: str, *overrides: str):
        return load_config(
            None,
            [
                f"train.name={name}",
                f"train.storage_path={work / 'runs'}",
                f"train.train_file={train_file}",
                f"train.index={work / 'index'}",
                "train.estimator=rag-sequence",
                f"train.steps={args.train_steps}",
                "train.batch_size=4",
                "train.lr=2e-3",
                "train.top_k=3",
                "train.num_workers=2",
                "train.cpus_per_worker=0.5",
                "train.checkpoint_every=2",
                "train.use_gpu=false",
                f"model.query_encoder.name_or_path={models['encoder']}",
                "model.query_encoder.max_length=32",
                f"model.generator={models['generator']}",
                f"model.reranker={models['reranker']}",
                "model.max_source_length=96",
                "model.max_target_length=12",
                *overrides,
            ],
        )

    # address="local": a Ray of our own; the dashboard stays (Ray Train V2 checks its controller through it)
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        print("train: no-fault run", flush=True)
        start = time.monotonic()
        base = run_training(config("base"))
        base_s = time.monotonic() - start
        print("train: rank 1 killed at step 3 (max_failures=1)", flush=True)
        marker = work / "killed.marker"
        cfg = config("killed", "train.max_failures=1")
        start = time.monotonic()
        error = None
        try:
            result = run_training(cfg, inject_failure=FailureInjection(rank=1, step=3, marker=str(marker)))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            result, error = None, exc
        killed_s = time.monotonic() - start
    finally:
        ray.shutdown()
    steps, events = read_metrics(local_metrics_path(cfg.train.storage_path, "killed"))
    restored = [e["step"] for e in events if e["event"] == "restored"]
    finished = result is not None and result["metrics"]["step"] == args.train_steps and result["final"] is not None
    outcome = (
        f"worker killed {int(marker.exists())}/1, finished {int(finished)}/1, "
        f"resumed from step {','.join(map(str, restored)) or 'none'}, steps logged {len(steps)}/{args.train_steps}"
    )
    if error is not None:
        outcome += f"; error: {type(error).__name__}: {str(error)[:80]}"
    return [
        {
            "scenario": "Ray Train worker (rank 1 of 2) killed at step 3",
            "trials": 1,
            "outcome": outcome,
            "time_ms": killed_s * 1000.0,
            "base_ms": base_s * 1000.0,
            "note": f"rag-sequence, tiny models, {args.train_steps} steps, checkpoint every 2; "
            f"base run finished at step {base['metrics']['step']}",
            "ok": finished and marker.exists() and restored == [2],
        }
    ]


def main() -> None:
    args = parse_args()
    groups = set(args.groups.split(","))
    unknown = groups - {"store", "train"}
    if unknown:
        raise SystemExit(f"unknown groups: {', '.join(sorted(unknown))} (known: store, train)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raggen-faults-st-"))
    t0 = time.monotonic()
    rows: list[dict] = []
    if "store" in groups:
        rows += store_rows(work / "store", args)
    if "train" in groups:
        rows += train_rows(work / "train", args)
    headers = ["scenario", "trials", "outcome", "time ms (median)", "no-fault ms (x)", "notes"]
    table = [
        [
            r["scenario"],
            r["trials"],
            r["outcome"],
            f"{r['time_ms']:.0f}",
            f"{r['base_ms']:.0f} ({r['time_ms'] / r['base_ms']:.2f}x)",
            r["note"],
        ]
        for r in rows
    ]
    print()
    print(machine())
    print(
        f"whole run {time.monotonic() - t0:.0f} s; groups {','.join(sorted(groups))}; {args.trials} trials per store scenario, train: one run with and one without the fault"
    )
    print(format_table(headers, table))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    if not all(r["ok"] for r in rows):
        raise SystemExit("some fault scenario did not end as claimed (see the table)")


if __name__ == "__main__":
    main()
