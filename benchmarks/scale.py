"""Scale: a synthetic IVF-PQ index of N vectors, published to S3 and served by shard actors on a 2-node
local Ray cluster, measured per stage, then projected to 21M passages.

No encoder: the vectors are unit vectors from a fixed seeded mixture (80% around 1000 centres,
20% uniform), and the queries are held-out draws from the same mixture, so recall against exact
search means something. Every step runs raggen's own code:

1. data: N x d vectors and Q queries; their exact top-100 by brute-force inner product (faiss.knn);
2. build (in this process, as ``tests/helpers.write_shards`` does for precomputed vectors): one
   shared quantizer (``shard.train_index``), one IVF-PQ index per shard (``build_shard_index``,
   contiguous rows, ids ``shard << 40 | position``), a passage parquet per shard with synthetic texts (``--text-words``, DPR's 100 by default),
   the search defaults tuned from ``SearchSettings.target_recall`` (or ``--target-recall``; ``tuning.shard_stats`` +
   ``combine``, the build's own tuning), ``make_manifest``;
3. publish to an S3 server (moto, in a child process on loopback) with ``publish_version``;
4. serve: ``cluster/local-multinode.sh`` starts a head and one worker node (token auth), the
   version is opened through shard actors (``open_index``, mode "actors": a SPREAD placement group,
   each actor loading its shards from S3 itself) and, as the baseline, opened in this process
   (mode "local"); a Retriever-like caller (a Ray actor holding only the group's handles) searches
   and fetches texts.

Printed: build time per stage, bytes on disk, peak RSS (VmHWM) of the driver per stage, of each
shard actor, of an idle actor with the same imports, and the caller's RSS: the growth of its first
search (Ray's connections to the actors, a fixed cost per replica), its transient peak while results
are held, and what it holds of its own once they are dropped (anon + file pages, the criterion
below; the object-store pages it touched, shared memory of the node, printed apart); single-query
p50/p99 (k=10, texts fetched) through the actors vs the same manifest opened locally, and a no-op
call to the same actors (Ray's round trip alone), measured interleaved, then local vs actors again at
``--latency-nprobe`` (default 128: more of the index's work per query, as real embeddings need);
recall@10/@100 vs exact at
the manifest's nprobe and with every list probed (the PQ ceiling). Acceptance ratios (PASS/FAIL): shard-actor peak RSS (loading its shards and
serving single queries; the peak after the k=100 batches, which adds their results, is printed
beside it) <= 1.3x its shards' bytes on disk;
what the warm caller holds < 5% of the index bytes; actor p50 <= 1.5x local p50; recall@100 at the
tuned nprobe within 1 point of exact search (>= 0.990; the issue's criterion), printed beside the
gap to the exhaustive (every list probed) recall, which is what the tuning targets: PQ codes cap
what any nprobe reaches, so plain IVF-PQ fails it (benchmarks/ann_quality.py measures re-ranking). Then the
projection to 21M passages from the per-passage ratios: bytes, shard actors, RAM per node, build
time on N workers.

    .venv/bin/python benchmarks/scale.py                  # full size: 2M x 768, IVF1024,PQ64, 8 shards, one actor per node
    .venv/bin/python benchmarks/scale.py --vectors 20000 --dim 64 --shards 4 --actors 2 \\
        --factory IVF64,PQ16 --queries 200          # tiny check, a few minutes on 2 cores
    .venv/bin/python benchmarks/scale.py --no-cluster ... # one local Ray node instead of the 2-node cluster

Full size needs ~8 GB of RAM in the driver (the vectors, for exact search and the build).
"""

from __future__ import annotations

import os

# shared machine: idle OpenMP threads must not spin (made FAISS training 4-7x slower there)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import format_table, machine, make_vectors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = ROOT / "cluster" / "local-multinode.sh"
MB = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vectors", type=int, default=2_000_000, help="passages (synthetic vectors) in the index")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--actors", type=int, default=None,
                   help="shard actors (each serves shards/actors shards); default: index.search's own layout, one "
                        "actor per node (2 here, on nodes of 1 CPU each)")  # fmt: skip
    p.add_argument("--factory", default="IVF1024,PQ64", help="faiss index_factory string")
    p.add_argument("--target-recall", type=float, default=None,
                   help="index.search.target_recall of the build's tuning (default: SearchSettings()'s; "
                        "configs/wiki-dpr-21m.yaml sets 0.995)")  # fmt: skip
    p.add_argument("--train-sample", type=int, default=65_536, help="vectors the shared quantizer is trained on")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall (and batch QPS)")
    p.add_argument("--latency-queries", type=int, default=200, help="single queries timed per backend")
    p.add_argument("--latency-nprobe", type=int, action="append", default=None,
                   help="also time single queries at this nprobe, local vs actors (repeatable; default 128: the "
                        "tuned nprobe of IVF1024,PQ48 on real MiniLM embeddings, benchmarks/ann_quality.py)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--actor-passages", choices=["mapped", "table"], default="mapped",
                   help="index.search.actor_passages: texts mapped from the cache, or decoded in each actor")  # fmt: skip
    p.add_argument("--no-table-baseline", dest="table_baseline", action="store_false",
                   help="skip the same-run baseline group with actor_passages: table")  # fmt: skip
    p.add_argument("--text-words", type=int, default=100,
                   help="words per synthetic passage text (DPR's passages: 100; 0: a tiny 'passage N' text)")  # fmt: skip
    p.add_argument("--no-cluster", action="store_true", help="one local Ray node instead of local-multinode.sh")
    p.add_argument("--cluster-timeout", type=float, default=300.0, help="s for local-multinode.sh start")
    p.add_argument("--cluster-attempts", type=int, default=3, help="tries of local-multinode.sh start")
    p.add_argument("--actor-timeout", type=float, default=900.0, help="s for the shard actors to load")
    p.add_argument("--project-passages", type=int, default=21_000_000)
    p.add_argument("--project-gpus", type=int, default=8, help="parallel build workers of the projection")
    p.add_argument("--project-actor-gb", type=float, default=4.0, help="shard bytes one actor may serve (projection)")
    p.add_argument("--work-dir", default=None, help="default: a temp dir, removed at the end")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ memory


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (peak) / RssAnon / RssFile / RssShmem of a process on this machine, in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def private(status: dict[str, int]) -> int:
    """A process's own resident pages: anonymous + file-backed (RSS less shared memory)."""
    return status.get("RssAnon", 0) + status.get("RssFile", 0)


def malloc_trim() -> bool:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim(0)``), so that RSS shows
    what a process holds rather than what its heap kept after freeing; False where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # 1: pages were released, 0: none to release
    except (OSError, AttributeError):
        return False
    return True


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5), so peaks are per stage."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _actor_status(_self) -> dict[str, int]:
    """(Run inside an actor through ``__ray_call__``.) Its own /proc status."""
    return proc_status()


def mb(x: float) -> str:
    return f"{x / MB:,.1f} MB"


# ------------------------------------------------------------------------------------------ data


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """k-recall@k: |found top-k ∩ true top-k| / k, averaged over queries."""
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth)]))


def global_rows(result) -> np.ndarray:
    """A SearchResult's passage ids (the global row numbers as strings) -> (b, k) int64, -1 for none."""
    return np.array([[int(i) if i else -1 for i in row] for row in result.ids], dtype=np.int64)


# ------------------------------------------------------------------------------------------ build


def synthetic_texts(n: int, words: int, seed: int) -> list[str]:
    """``n`` texts of ``words`` words from a Zipf-distributed synthetic vocabulary (30k words of 2-10
    letters, a fixed seed), so the texts compress roughly as English does (~2-3x, not 10x)."""
    vocab_rng = np.random.default_rng(424242)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27) ** 0.9
    lengths = vocab_rng.integers(2, 11, 30_000)
    vocab = ["".join(vocab_rng.choice(letters, n_letters, p=freq / freq.sum())) for n_letters in lengths]
    rank = 1.0 / np.arange(1, len(vocab) + 1)
    picks = np.random.default_rng(seed).choice(len(vocab), size=(n, words), p=rank / rank.sum())
    return [" ".join(vocab[w] for w in row) for row in picks]


def build(xb: np.ndarray, out: Path, args) -> tuple[object, dict]:
    """Shard files + tuned manifest in ``out`` (raggen's build functions, in this process)."""
    from raggen.index import shard as S
    from raggen.index import tuning
    from raggen.index.manifest import make_manifest, shard_file_names
    from raggen.index.passage_table import passages_table, write_parquet_atomic
    from raggen.index.settings import SearchSettings

    search = SearchSettings() if args.target_recall is None else SearchSettings(target_recall=args.target_recall)
    n, d = xb.shape
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.perf_counter()
    trained = S.train_index(xb, factory=args.factory, metric="ip", train_sample=args.train_sample, seed=args.seed)
    times["train"] = time.perf_counter() - t0
    xq_tune = tuning.sample_queries(
        xb, search.tune_queries, seed=args.seed, similarity=search.tune_query_similarity
    )  # as prepare_build samples them
    times["add"] = times["write"] = times["tune"] = 0.0
    files, stats, bounds = [], [], np.linspace(0, n, args.shards + 1).astype(np.int64)
    for s in range(args.shards):
        a, b = int(bounds[s]), int(bounds[s + 1])
        ids = (np.int64(s) << 40) + np.arange(b - a, dtype=np.int64)
        t0 = time.perf_counter()
        index = S.build_shard_index(xb[a:b], ids, factory=args.factory, metric="ip", trained_index=trained)
        t1 = time.perf_counter()
        index_name, passages_name = shard_file_names(s)
        S.write_index_file(index, out / index_name)
        rows = range(a, b)
        texts = (
            synthetic_texts(b - a, args.text_words, seed=args.seed + s)
            if args.text_words
            else [f"passage {r}" for r in rows]
        )
        table = passages_table(ids, [str(r) for r in rows], [f"title {r}" for r in rows], texts)
        write_parquet_atomic(table, out / passages_name)
        t2 = time.perf_counter()
        stats.append(tuning.shard_stats(index, xb[a:b], ids, xq_tune, k=search.tune_k, metric="ip"))
        t3 = time.perf_counter()
        times["add"] += t1 - t0
        times["write"] += t2 - t1
        times["tune"] += t3 - t2
        files.append((out / index_name, out / passages_name, b - a))
        del index, table
    t0 = time.perf_counter()
    defaults = tuning.combine(stats, k=min(search.tune_k, n), target_recall=float(search.target_recall))
    times["tune"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = make_manifest("scale-v1", encoder_name_or_path="synthetic-mixture", pooling="none", dim=d,
                             normalize=True, metric="ip", faiss_factory=args.factory, shard_files=files,
                             passage_format="joined", search_defaults=defaults)  # fmt: skip
    times["manifest"] = time.perf_counter() - t0  # sha256 of every file
    return manifest, times


# ------------------------------------------------------------------------------------------ S3 + cluster


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(timeout_s: float = 60.0) -> tuple[subprocess.Popen, dict]:
    """A moto S3 server in a child process on 127.0.0.1 (its memory is not the driver's)."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto S3 server on {url} did not come up within {timeout_s:.0f} s") from None
            time.sleep(0.5)
    options = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "testing",
               "aws_secret_access_key": "testing", "max_attempts": 2}  # fmt: skip
    return proc, options


def cluster_env(state: Path) -> dict[str, str]:
    """The environment of local-multinode.sh and of its nodes: this tree's raggen on PYTHONPATH, this
    venv's ray, a state folder of our own, token auth."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAGGEN_RAY_DIR=str(state), RAY_BIN=str(Path(sys.executable).parent / "ray"), RAY_AUTH_MODE="token",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    return env


def start_cluster(state: Path, cpus_per_node: int, timeout_s: float, attempts: int) -> str:
    """Head + 1 worker node by ``cluster/local-multinode.sh``; the GCS address. A start that does not
    finish within ``timeout_s`` is killed (its process group) and the nodes it started are stopped;
    a failed start is tried again up to ``attempts`` times (on a loaded machine a raylet can miss
    Ray's fixed 30 s registration window), then raises."""
    cmd = [str(CLUSTER_SCRIPT), "start", "--workers", "1", "--head-cpus", str(cpus_per_node),
           "--worker-cpus", str(cpus_per_node)]  # fmt: skip
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen(cmd, env=cluster_env(state), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            if proc.returncode == 0:
                return (state / "gcs_address").read_text().strip()
            error = f"local-multinode.sh start failed (rc {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and its probes; the nodes (own sessions): stop
            output, _ = proc.communicate()
            error = f"local-multinode.sh start did not finish within {timeout_s:.0f} s"
        stop_cluster(state)
        tail = "\n".join(output.strip().splitlines()[-3:])
        print(f"cluster start, attempt {attempt} of {attempts}: {error}:\n{tail}", file=sys.stderr, flush=True)
    raise RuntimeError(
        f"{error} after {attempts} attempt(s) (a loaded machine? raise --cluster-timeout / --cluster-attempts, "
        f"or run with --no-cluster); node logs were in {state}/logs; its output:\n{output[-2000:]}"
    )


def stop_cluster(state: Path) -> None:
    try:
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], env=cluster_env(state), timeout=180, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    except subprocess.TimeoutExpired:
        print(f"warning: local-multinode.sh stop timed out; see {state}/pids", file=sys.stderr)


# ------------------------------------------------------------------------------------------ actors


class IdleProbe:
    """An actor with a shard actor's imports and nothing loaded: the RSS every actor starts from."""

    def __init__(self):
        import boto3  # noqa: F401  (a shard actor reading S3 has it loaded)
        import faiss  # noqa: F401
        import pyarrow.parquet  # noqa: F401

        import raggen.index.shard_server  # noqa: F401  (what unpickling ShardServer imports)
        import raggen.storage.stores  # noqa: F401

    def status(self) -> dict[str, int]:
        return proc_status()


class RetrieverLikeCaller:
    """Holds a borrowed ShardActorGroup only (as a Serve Retriever replica does); searches through it,
    fetching texts, and reports its RSS at each stage: the first search sets up what any Ray caller of
    these actors needs (connections to each actor's worker, the result types' imports, a copy of the
    IVF quantizer the shards share: ``ActorBackend.caller_quantizer``), a fixed cost
    per replica; what the replica *holds* of the index is its RSS after many more searches, results
    dropped, against its RSS after that first search."""

    def __init__(self):
        import raggen.index.actors  # noqa: F401
        import raggen.index.sharded  # noqa: F401

    def run(self, group, xq: np.ndarray, k: int, single: int) -> dict:
        import gc

        reset_peak()
        before = proc_status()
        index = group.sharded_index()
        t0 = time.perf_counter()
        index.search(xq[:1], k, embeddings=False)  # the warm-up: connections to every actor
        first_ms = (time.perf_counter() - t0) * 1e3
        gc.collect()
        warm = proc_status()
        latencies = []
        for q in xq[:single]:
            t0 = time.perf_counter()
            index.search(q[None], k, embeddings=False)
            latencies.append(time.perf_counter() - t0)
        res = index.search(xq, k, embeddings=False)
        texts = sum(1 for row in res.texts for t in row if t)
        peak = proc_status()
        del res
        gc.collect()
        kept = proc_status()  # freed results whose pages the allocator keeps for the next request
        trimmed = malloc_trim()
        after = proc_status()
        index.close()  # borrowed: the group stays up
        return {"before": before, "warm": warm, "peak": peak, "kept": kept, "after": after, "trimmed": trimmed,
                "latencies": latencies, "texts": texts, "first_ms": first_ms}  # fmt: skip


def interleaved_p50_p99(searches: dict, queries: np.ndarray, *, warmup: np.ndarray) -> dict[str, tuple[float, float]]:
    """{name: search(one query)} -> {name: (p50, p99) ms} over ``queries``, the searches taken in turns
    (their order reversed every other query: the machine's load drifts); each first runs the
    ``warmup`` queries untimed (mapped pages touched, the actors' thread pools started)."""
    for q in warmup:
        for search in searches.values():
            search(q)
    names = list(searches)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, q in enumerate(queries):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            searches[name](q)
            times[name].append(time.perf_counter() - t0)
    return {name: (np.percentile(v, 50) * 1e3, np.percentile(v, 99) * 1e3) for name, v in times.items()}


def node_names(ray) -> dict[str, str]:
    """Node id -> "head" / "worker" (local-multinode.sh gives workers the raggen_worker resource)."""
    return {n["NodeID"]: ("worker" if "raggen_worker" in n["Resources"] else "head") for n in ray.nodes() if n["Alive"]}


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    own_work = args.work_dir is None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raggen-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="rgs-", dir=os.environ.get("RAY_TMPDIR")))  # short: Ray's sockets
    if not args.no_cluster:  # a client of a token-auth cluster needs both before Ray is imported
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state / "auth_token"))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f}s] {msg}", flush=True)

    rows: list[list[str]] = []  # stage, measurement, measured, per passage, ratio, criterion, result
    m: dict = {}  # raw numbers (JSON, projection)

    def row(stage, what, measured, per="", ratio="", criterion="", ok=None):
        result = "" if ok is None else ("PASS" if ok else "FAIL")
        rows.append([stage, what, measured, per, ratio, criterion, result])

    n, d = args.vectors, args.dim
    moto = cluster_up = None
    local_index = actor_index = None
    ray = None
    try:
        # 1. data + exact ground truth
        import faiss

        reset_peak()
        t0 = time.perf_counter()
        xb = make_vectors(n, d, seed=args.seed)
        xq = make_vectors(args.queries, d, seed=args.seed + 1_000_003)
        _, gt = faiss.knn(xq, xb, 100, metric=faiss.METRIC_INNER_PRODUCT)
        m["data_s"] = time.perf_counter() - t0
        m["driver_data_peak"] = proc_status()["VmHWM"]
        row(
            "data",
            f"{n:,} x {d} mixture vectors, exact top-100 of {args.queries} held-out queries",
            f"{m['data_s']:.1f} s",
        )
        log("data + exact top-100 done")

        # 2. build
        reset_peak()
        out = work / "build"
        manifest, times = build(xb, out, args)
        m["build"] = times
        m["build_s"] = sum(times.values())
        m["driver_build_peak"] = proc_status()["VmHWM"]
        defaults = manifest.search_defaults
        nprobe = defaults.nprobe if defaults is not None else None
        nlist = faiss.extract_index_ivf(faiss.read_index(str(out / manifest.shards[0].index))).nlist
        us = lambda s: f"{s / n * 1e6:.1f} us"  # noqa: E731
        row("build", f"total ({args.factory}, {args.shards} shards)", f"{m['build_s']:.1f} s", us(m["build_s"]))
        row("build", f"  train shared quantizer on {min(args.train_sample, n):,} vectors", f"{times['train']:.1f} s")
        row("build", "  add vectors to the shards", f"{times['add']:.1f} s", us(times["add"]))
        row("build", "  write .faiss + .parquet", f"{times['write']:.1f} s", us(times["write"]))
        row("build", f"  tune nprobe (target recall {defaults.target_recall if defaults else '-'}) -> {nprobe} of {nlist}",
            f"{times['tune']:.1f} s", us(times["tune"]),
            f"tuning recall@{defaults.k} {defaults.recall:.3f} / all lists {defaults.max_recall:.3f}" if defaults else "")  # fmt: skip
        row("build", "  manifest (sha256 of every file)", f"{times['manifest']:.1f} s", us(times["manifest"]))
        faiss_bytes = sum((out / s.index).stat().st_size for s in manifest.shards)
        parquet_bytes = sum((out / s.passages).stat().st_size for s in manifest.shards)
        index_bytes = faiss_bytes + parquet_bytes
        m.update(
            faiss_bytes=faiss_bytes, parquet_bytes=parquet_bytes, index_bytes=index_bytes, nprobe=nprobe, nlist=nlist
        )
        per_b = lambda b: f"{b / n:.1f} B"  # noqa: E731
        row(
            "disk",
            "bytes on disk: .faiss",
            mb(faiss_bytes),
            per_b(faiss_bytes),
            f"{faiss_bytes / (n * d * 4):.3f}x of fp32 Flat",
        )
        what = f"ids + texts of {args.text_words} synthetic words" if args.text_words else "ids + tiny texts"
        row("disk", f"bytes on disk: .parquet ({what})", mb(parquet_bytes), per_b(parquet_bytes))
        row("disk", "bytes on disk: all shard files", mb(index_bytes), per_b(index_bytes))
        log(f"build done: nprobe {nprobe} of {nlist}")

        # 3. publish to S3 (moto)
        from raggen.index.actors import shard_bytes
        from raggen.index.publish import publish_version
        from raggen.storage import s3_client

        reset_peak()
        moto, s3 = start_moto()
        s3_client(s3).create_bucket(Bucket="scale")
        root = "s3://scale/index"
        t0 = time.perf_counter()
        publish_version(root, manifest, out, s3_options=s3)
        m["publish_s"] = time.perf_counter() - t0
        m["driver_publish_peak"] = proc_status()["VmHWM"]
        stored = shard_bytes(f"{root}/{manifest.version}", manifest, s3)
        row("publish", "publish_version to S3 (moto on loopback; upload + read-back sha256)", f"{m['publish_s']:.1f} s",
            "", f"{index_bytes / MB / m['publish_s']:.1f} MB/s", f"store holds {mb(stored or 0)}")  # fmt: skip
        log("published")

        # 4. Ray: a 2-node local cluster (or one local node)
        # --actors N: N actors of 1 CPU (nodes declare ceil(N / 2) CPUs each, whatever the machine has);
        # default: SearchSettings' layout (shards_per_actor None: one actor per node) on nodes of 1 CPU
        per_actor = None if args.actors is None else math.ceil(args.shards / args.actors)
        num_actors = (1 if args.no_cluster else 2) if per_actor is None else math.ceil(args.shards / per_actor)
        if args.no_cluster:
            import ray

            ray.init(address="local", num_cpus=max(2, num_actors), include_dashboard=False, log_to_driver=False)
        else:
            cluster_up = True
            gcs = start_cluster(state, max(1, math.ceil(num_actors / 2)), args.cluster_timeout, args.cluster_attempts)
            import ray

            ray.init(address=gcs, log_to_driver=False, logging_level="ERROR")
        log(f"ray up: {len(node_names(ray))} node(s)")

        from raggen.index.open_search import open_index
        from raggen.index.settings import SearchSettings

        idle = ray.remote(num_cpus=0)(IdleProbe).remote()
        t0 = time.perf_counter()
        actor_settings = SearchSettings(mode="actors", actor_num_cpus=1.0, shards_per_actor=per_actor,
                                        actor_passages=args.actor_passages)  # fmt: skip
        actor_index = open_index(root, settings=actor_settings, s3_options=s3, cache_dir=work / "cache-actors",
                                 load_embeddings=False)  # fmt: skip
        m["actors_open_s"] = time.perf_counter() - t0
        group = actor_index.actor_group
        log(f"{len(group.handles)} shard actors loaded")
        reset_peak()
        before_local = proc_status()["VmRSS"]
        t0 = time.perf_counter()
        local_index = open_index(root, settings=SearchSettings(mode="local"), s3_options=s3,
                                 cache_dir=work / "cache-local", load_embeddings=False)  # fmt: skip
        m["local_open_s"] = time.perf_counter() - t0
        names = node_names(ray)
        infos = group.info()
        nodes = sorted({names.get(i["node_id"], i["node_id"][:8]) for i in infos})
        sizes = "/".join(sorted({str(len(i["shards"])) for i in infos}))  # shards per actor
        row("serve", "open through shard actors (S3 download + sha256 + mmap, in the actors)", f"{m['actors_open_s']:.1f} s",
            "", "", f"{len(infos)} actors x {sizes} shards on {len(nodes)} node(s): {', '.join(nodes)}")  # fmt: skip
        row("serve", "open in this process (local baseline)", f"{m['local_open_s']:.1f} s")

        # latency: single queries, k=10, texts fetched; local and actors interleaved (the load drifts)
        k_lat, L = 10, min(args.latency_queries, args.queries)
        ray_index = group.sharded_index(direct_calls=False)  # the same actors through Ray calls only
        searches = {"local": lambda q: local_index.search(q[None], k_lat, embeddings=False),
                    "actors": lambda q: actor_index.search(q[None], k_lat, embeddings=False),
                    "actors_ray": lambda q: ray_index.search(q[None], k_lat, embeddings=False),
                    "ping": lambda q: ray.get([h.ping.remote() for h in group.handles]),
                    "direct_ping": lambda q: actor_index._backend.ping_direct()}  # fmt: skip
        p = interleaved_p50_p99(searches, xq[:L], warmup=xq[:10])
        m["latency_ms"] = p
        # each actor's peak so far: loading its shards and serving single queries (what holding the
        # index costs); the batch below adds request-sized results (100k texts per actor at once)
        served = [ray.get(h.__ray_call__.remote(_actor_status)) for h in group.handles]
        ratio = p["actors"][0] / p["local"][0]
        row("search", f"single query p50 / p99, k={k_lat} + texts: local (1 process, {args.shards} shards)",
            f"{p['local'][0]:.2f} / {p['local'][1]:.2f} ms")  # fmt: skip
        row("search", f"  same through {len(infos)} shard actors (direct calls: top-k, then the winners' texts)",
            f"{p['actors'][0]:.2f} / {p['actors'][1]:.2f} ms", "", f"{ratio:.2f}x local p50", "<= 1.5x", ratio <= 1.5)  # fmt: skip
        row("search", "  same actors through Ray calls only (one call per actor: top-k with its texts)",
            f"{p['actors_ray'][0]:.2f} / {p['actors_ray'][1]:.2f} ms", "",
            f"{p['actors_ray'][0] / p['local'][0]:.2f}x local p50")  # fmt: skip
        row("search", f"  a no-op to the same {len(infos)} actors: a Ray call; a direct call",
            f"{p['ping'][0]:.2f} / {p['ping'][1]:.2f} ms; {p['direct_ping'][0]:.2f} / {p['direct_ping'][1]:.2f} ms", "",
            f"{p['ping'][0] / p['local'][0]:.2f}x; {p['direct_ping'][0] / p['local'][0]:.2f}x local p50")  # fmt: skip
        for extra in args.latency_nprobe or [128]:  # the same, with more of the index's work per query
            if extra == nprobe or extra > nlist:
                continue
            at_nprobe = {kind: (lambda q, index=index, extra=extra:
                                index.search(q[None], k_lat, nprobe=extra, embeddings=False))
                         for kind, index in (("local", local_index), ("actors", actor_index))}  # fmt: skip
            pe = interleaved_p50_p99(at_nprobe, xq[10 : L + 10], warmup=xq[:10])  # warm-up: more lists' pages
            m[f"latency_nprobe_{extra}_ms"] = pe
            row("search", f"  at nprobe {extra} of {nlist}: single query p50 / p99, local; through the actors",
                f"{pe['local'][0]:.2f} / {pe['local'][1]:.2f} ms; {pe['actors'][0]:.2f} / {pe['actors'][1]:.2f} ms", "",
                f"{pe['actors'][0] / pe['local'][0]:.2f}x local p50")  # fmt: skip

        # recall vs exact, batch QPS
        found = {}
        for kind, index in (("local", local_index), ("actors", actor_index)):
            t0 = time.perf_counter()
            res = index.search(xq, 100, embeddings=False)
            m[f"batch_qps_{kind}"] = len(xq) / (time.perf_counter() - t0)
            found[kind] = global_rows(res)
        res_all = actor_index.search(xq, 100, nprobe=nlist, embeddings=False)
        found_all = global_rows(res_all)
        r = {
            "nprobe": (recall_at(found["actors"], gt, 10), recall_at(found["actors"], gt, 100)),
            "all": (recall_at(found_all, gt, 10), recall_at(found_all, gt, 100)),
        }
        m["recall"] = r
        same = float(np.mean(found["actors"] == found["local"]))
        row("search", f"batch of {len(xq)} queries, k=100 + texts: queries/s local / actors",
            f"{m['batch_qps_local']:.0f} / {m['batch_qps_actors']:.0f}", "", f"{m['batch_qps_actors'] / m['batch_qps_local']:.2f}x",
            f"top-100 ids equal to local: {same:.3f}")  # fmt: skip
        gap = r["all"][1] - r["nprobe"][1]
        row("recall", f"recall@10 / @100 vs exact at the manifest's nprobe {nprobe}",
            f"{r['nprobe'][0]:.3f} / {r['nprobe'][1]:.3f}", "",
            f"{gap * 100:+.1f} points below all lists (the tuning's target)",
            "@100 within 1 point of exact (>= 0.990)", r["nprobe"][1] >= 0.99 - 1e-9)  # fmt: skip
        row("recall", f"recall@10 / @100 vs exact, all {nlist} lists probed (the PQ ceiling)",
            f"{r['all'][0]:.3f} / {r['all'][1]:.3f}", "", "", "exact search: 1.000 / 1.000")  # fmt: skip
        log("latency + recall done")

        # the Retriever-like caller: RSS growth while searching through the actors
        caller = ray.remote(num_cpus=0)(RetrieverLikeCaller).remote()
        c = ray.get(caller.run.remote(group, xq, k_lat, L), timeout=args.actor_timeout)
        warmup = c["warm"]["VmRSS"] - c["before"]["VmRSS"]
        # what it holds once warm, results dropped: its own pages (anon + file). RSS also counts the
        # pages of Ray's object store (shared memory, the node's, reused for the next objects) that
        # the caller touched reading large answers and putting large query batches: shown apart
        growth = private(c["after"]) - private(c["warm"])
        shm = c["after"].get("RssShmem", 0) - c["warm"].get("RssShmem", 0)
        kept = c["kept"]["VmRSS"] - c["warm"]["VmRSS"]  # the same before malloc_trim: freed heap kept
        transient = max(c["peak"]["VmHWM"], c["peak"]["VmRSS"]) - c["warm"]["VmRSS"]
        m["caller"] = {**c, "growth": growth, "shm": shm, "warmup": warmup, "transient": transient}
        row("memory", "Retriever-like caller (a Ray actor): RSS growth of its first search (Ray connections, imports, "
            "its copy of a shared IVF quantizer)",
            mb(warmup), "", f"fixed per replica; first search {c['first_ms']:.0f} ms")  # fmt: skip
        row("memory", f"  its peak above that during {L} + {len(xq)} searches with texts (results held)",
            mb(transient), "", f"{transient / index_bytes * 100:.1f}% of index bytes, transient")  # fmt: skip
        cp50, cp99 = np.percentile(c["latencies"], 50) * 1e3, np.percentile(c["latencies"], 99) * 1e3
        row("memory", "  after them, results dropped: RSS above its warm RSS, allocator's free pages kept",
            mb(kept), "", f"{kept / index_bytes * 100:.1f}% of index bytes", "request-sized, reused")  # fmt: skip
        row("memory", f"  what it holds: the same after malloc_trim{'' if c['trimmed'] else ' (no glibc: untrimmed)'}, "
            "its own pages (anon + file)", mb(growth), per_b(growth), f"{growth / index_bytes * 100:.1f}% of index bytes",
            "< 5%", growth < 0.05 * index_bytes)  # fmt: skip
        row("memory", "  + object-store pages it touched (shared memory of the node's object store, counted in its RSS)",
            mb(shm), "", f"{(growth + shm) / index_bytes * 100:.1f}% of index bytes with them")  # fmt: skip
        row("memory", "  its single-query p50 / p99 (k=10 + texts)", f"{cp50:.2f} / {cp99:.2f} ms", "",
            f"{cp50 / p['local'][0]:.2f}x local p50")  # fmt: skip
        ray.kill(caller)

        # shard actors' peak RSS vs their shards' bytes on disk; an idle actor's
        idle_status = ray.get(idle.status.remote())
        idle_peak = idle_status["VmHWM"]
        m["idle_actor"] = idle_status
        row("memory", "idle actor (a shard actor's imports, nothing loaded): peak RSS", mb(idle_peak))
        file_bytes = {i: (out / s.index).stat().st_size + (out / s.passages).stat().st_size
                      for i, s in enumerate(manifest.shards)}  # fmt: skip
        m["actors"] = []
        worst = worst_above = 0.0
        for h, info, before_batch in zip(group.handles, infos, served):
            st = ray.get(h.__ray_call__.remote(_actor_status))
            sb = sum(file_bytes[s] for s in info["shards"])
            peak = before_batch.get("VmHWM", info["rss_bytes"])
            total, above = peak / sb, (peak - idle_peak) / sb
            worst, worst_above = max(worst, total), max(worst_above, above)
            m["actors"].append({"shards": info["shards"], "node": names.get(info["node_id"]), "shard_bytes": sb,
                                "served": before_batch, "status": st, "queries": ray.get(h.info.remote())["queries"]})  # fmt: skip
            row("memory", f"shard actor {info['shards']} on {names.get(info['node_id'], '?')}: peak RSS loading + "
                "single queries (anon + file then) / after the k=100 batches too",
                f"{mb(peak)} ({mb(before_batch.get('RssAnon', 0))} + {mb(before_batch.get('RssFile', 0))}) / "
                f"{mb(st.get('VmHWM', 0))}", f"{peak / sum(info['counts']):.0f} B",
                f"{total:.2f}x its shards' {mb(sb)}; {above:.2f}x above idle", "<= 1.3x", total <= 1.3)  # fmt: skip
        ray.kill(idle)
        if args.table_baseline and args.actor_passages == "mapped":
            m["table_baseline"] = table_baseline(ray, actor_index, actor_settings, root, s3, work, xq[:L], k_lat,
                                                 file_bytes, worst)  # fmt: skip
            actor_index = None  # closed there: the baseline group needs the same CPUs
            tb = m["table_baseline"]
            row("memory", "same shards in a new group with actor_passages: table (decoded, as before): peak RSS",
                f"{mb(min(tb['peaks']))}-{mb(max(tb['peaks']))}", "",
                f"{tb['worst_ratio']:.2f}x its shards' bytes; mapped / table {worst / tb['worst_ratio']:.2f}x",
                "same run")  # fmt: skip
        row("memory", "driver peak RSS: data / build / publish", " / ".join(mb(m[f"driver_{s}_peak"]) for s in ("data", "build", "publish")),
            "", f"holds the vectors: {mb(xb.nbytes + xq.nbytes)}")  # fmt: skip
        local_after = proc_status()
        local_growth = max(local_after["VmHWM"], local_after["VmRSS"]) - before_local
        m["local_growth"] = local_growth
        row("memory", "  driver RSS growth from opening + searching locally (for contrast)", mb(local_growth),
            per_b(local_growth), f"{local_growth / index_bytes * 100:.1f}% of index bytes")  # fmt: skip
        moto_peak = proc_status(moto.pid).get("VmHWM", 0)
        row("memory", "S3 server (moto, holds the objects in memory): peak RSS", mb(moto_peak))
        m.update(worst_actor_ratio=worst, worst_actor_above_idle=worst_above, num_actors=len(infos), nodes=nodes)
        log("memory done")
    finally:
        for index in (local_index, actor_index):
            if index is not None:
                index.close()
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        if cluster_up:
            stop_cluster(state)
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
        shutil.rmtree(state, ignore_errors=True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)

    proj = projection(m, n, args)
    print()
    print(machine())
    print(f"whole run {time.perf_counter() - started:.0f} s; {'2-node local cluster (local-multinode.sh)' if not args.no_cluster else 'one local Ray node (--no-cluster)'}; "
          f"{n:,} x {d}, {args.factory}, {args.shards} shards, {m['num_actors']} shard actors, {args.queries} queries")  # fmt: skip
    print(format_table(["stage", "measurement", "measured", "per passage", "ratio", "criterion", "result"], rows))
    print()
    print(f"projection to {args.project_passages:,} passages (same factory, from this run's per-passage ratios)")
    print(format_table(["quantity", "projected", "from"], proj))
    if m["index_bytes"] / m["num_actors"] < 100e6:
        print(f"note: each actor served {mb(m['index_bytes'] / m['num_actors'])} of shards here, so its RSS above idle is "
              "mostly fixed overhead (Ray worker, thread pools): the per-actor projection overstates; run at full size")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows,
                                              "projection": proj, "raw": m}, indent=2, default=float))  # fmt: skip


def table_baseline(ray, actor_index, settings, root, s3, work, xq, k, file_bytes, mapped_worst) -> dict:
    """Close the mapped group, start the same shards with ``actor_passages: table``, serve the same
    single queries, and return each actor's peak RSS (the same-run baseline of the passage store)."""
    from raggen.index.open_search import open_index

    actor_index.close()
    index = open_index(root, settings=settings.model_copy(update={"actor_passages": "table"}), s3_options=s3,
                       cache_dir=work / "cache-actors", load_embeddings=False)  # fmt: skip
    try:
        for q in xq:
            index.search(q[None], k, embeddings=False)
        group = index.actor_group
        peaks, ratios = [], []
        for h, info in zip(group.handles, group.info()):
            peak = ray.get(h.__ray_call__.remote(_actor_status))["VmHWM"]
            peaks.append(peak)
            ratios.append(peak / sum(file_bytes[s] for s in info["shards"]))
    finally:
        index.close()
    return {"peaks": peaks, "worst_ratio": max(ratios), "mapped_worst_ratio": mapped_worst}


def projection(m: dict, n: int, args) -> list[list[str]]:
    """RAM per node, shard actors and build time at ``args.project_passages`` from the measured ratios."""
    P, nodes = args.project_passages, 1 if args.no_cluster else 2
    scale = P / n
    idx = m["index_bytes"] * scale
    faiss_b = m["faiss_bytes"] * scale
    idle = m["idle_actor"]["VmHWM"]
    above = m["worst_actor_above_idle"]
    actors = max(m["num_actors"], math.ceil(idx / (args.project_actor_gb * 1e9)))
    actors = math.ceil(actors / nodes) * nodes
    per_actor = idle + above * idx / actors
    t = m["build"]
    linear = (t["add"] + t["write"] + t["tune"] + t["manifest"]) * scale  # grow with the passages
    gpus = args.project_gpus
    build_s = t["train"] + linear / gpus
    return [
        ["shard files (.faiss + .parquet)", f"{idx / 1e9:.2f} GB", f"{m['index_bytes'] / n:.1f} B/passage"],
        ["  of which .faiss", f"{faiss_b / 1e9:.2f} GB", f"{m['faiss_bytes'] / n:.1f} B/passage"],
        ["  of which .parquet (ids, titles, texts)", f"{(idx - faiss_b) / 1e9:.2f} GB",
         f"{(m['index_bytes'] - m['faiss_bytes']) / n:.1f} B/passage" + ("" if args.text_words else
         "; tiny texts here: DPR's would add ~600 B/passage uncompressed")],
        ["shard actors", f"{actors} ({actors // nodes} per node)",
         f"max(this run's {m['num_actors']}, shard bytes / {args.project_actor_gb:g} GB per actor), a multiple of {nodes} node(s)"],
        ["peak RSS per shard actor", f"{per_actor / 1e9:.2f} GB",
         f"idle {idle / 1e9:.2f} GB + {above:.2f} x its shard bytes ({idx / actors / 1e9:.2f} GB)"],
        ["RAM per node (shard actors)", f"{per_actor * actors / nodes / 1e9:.2f} GB", f"{actors // nodes} actors x {per_actor / 1e9:.2f} GB"],
        ["Retriever-like caller", f"{m['caller']['warmup'] / 1e6:.0f} MB to connect + {m['caller']['growth'] / 1e6:.0f} MB held", "measured here; handles, and a copy of the IVF quantizer the shards share up to index.search.caller_quantizer_max_bytes (not scaled)"],
        [f"build time on {gpus} workers", f"{build_s / 60:.1f} min",
         f"train {t['train']:.0f} s once + {linear / scale / n * 1e6:.1f} us/passage x {P:,} / {gpus}; rate measured on "
         f"{'this CPU' if faiss_gpus() == 0 else 'GPU'} (a GPU adds faster: not measured here)"],
    ]  # fmt: skip


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


if __name__ == "__main__":
    main()
