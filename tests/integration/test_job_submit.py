"""Submit a real raggen job to a real local Ray cluster with the `ray job submit` CLI.

The cluster is `ray start --head --block` from the Ray beside the running python (the repo's
.venv under `make test`), so the job's driver and workers use that venv too. Every process gets
the same token-auth settings: Ray 2.60 turns token auth on for a head when a token exists but a
client only when RAY_AUTH_MODE=token, so we set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (a
token of our own, never ~/.ray/auth_token) for the head and for each CLI call alike.
The cluster is stopped by signalling the processes we started, not `ray stop`, which would end
every Ray cluster on the machine. Each step has a deadline, so a broken cluster fails, not hangs.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 180
EXCLUDES = [".venv", ".git", "artifacts", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache"]


@dataclass
class Cluster:
    address: str  # the dashboard / job API: http://127.0.0.1:PORT
    gcs_address: str  # what ray.init / RAY_ADDRESS take: 127.0.0.1:PORT
    env: dict[str, str]
    root: Path
    log: Path

    def ray(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(RAY), *args], env=env or self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_env(token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API_SERVER"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops the node now, not after a 30 s drain
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
    )
    return env


def _job_api_answers(address: str) -> bool:
    """The dashboard is up (any HTTP answer; 401 without a token means it is)."""
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _session_pids(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` we started; its hook stops the node. Then anything left
    in its session (raylet workers lead their own process groups) is killed by pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 10
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(no_shared_ray):
    assert RAY.exists(), f"no ray CLI beside {sys.executable}: ray[default] is a dependency; the install is broken"
    root = Path(tempfile.mkdtemp(prefix="rgj-", dir="/tmp"))  # short: Ray's unix sockets live below
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _cluster_env(token)
    gcs, dash, client, agent = _free_ports(4)
    log = root / "head.log"
    cmd = [
        str(RAY),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--object-store-memory={200 * 1024 * 1024}",
        f"--temp-dir={root / 'ray'}",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    c = Cluster(address=f"http://127.0.0.1:{dash}", gcs_address=f"127.0.0.1:{gcs}", env=env, root=root, log=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if _job_api_answers(c.address) and c.ray("job", "list", "--address", c.address).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the job API did not come up in {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield c
    finally:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _submit(c: Cluster, *job_args: str) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit` (waits for the end, tailing logs); returns (submission id, process)."""
    sub_id = f"raggen-test-{uuid.uuid4().hex[:8]}"
    cmd = [
        "job",
        "submit",
        "--address",
        c.address,
        "--submission-id",
        sub_id,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--",
        "python",
        *job_args,
    ]
    try:
        return sub_id, c.ray(*cmd, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        c.ray("job", "stop", "--address", c.address, sub_id)
        logs = c.ray("job", "logs", "--address", c.address, sub_id).stdout
        pytest.fail(f"job {sub_id} did not finish in {JOB_TIMEOUT_S}s; its logs:\n{logs[-3000:]}")


def _status(c: Cluster, sub_id: str) -> str:
    """The job's status from the job REST API, with the cluster's token as a bearer token."""
    token = Path(c.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    req = urllib.request.Request(f"{c.address}/api/jobs/{sub_id}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["status"]


def _count_passages(path: Path) -> tuple[int, int]:
    """(passages, words) read straight from the DPR TSV, independently of raggen's readers."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return len(rows), sum(len(r["text"].split()) for r in rows)


def test_smoke_job_succeeds_on_the_cluster(cluster):
    out, world = cluster.root / "result.json", cluster.root / "world"
    sub_id, proc = _submit(
        cluster, "jobs/smoke.py", "--out", str(out), "--world-dir", str(world), "--num-entities", "50"
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert _status(cluster, sub_id) == "SUCCEEDED"

    result = json.loads(out.read_text())
    passages, words = _count_passages(world / "passages.tsv")
    assert passages > 0
    assert result["num_passages"] == passages
    assert result["num_words"] == words
    assert result["ids_unique"] is True
    assert result["cluster_resources"]["CPU"] == 2.0  # it ran on our cluster, not a fresh local one
    assert len(result["map_nodes"]) == result["cluster_nodes"] == 1
    assert Path(result["python"]).parent == BIN, "the job must run on the test's venv"


def test_failing_job_is_reported_failed(cluster):
    sub_id, proc = _submit(
        cluster, "jobs/smoke.py", "--out", str(cluster.root / "never.json"), "--num-entities", "5"
    )  # below the minimum: the job exits 2
    assert proc.returncode != 0
    assert _status(cluster, sub_id) == "FAILED"
    assert not (cluster.root / "never.json").exists()


def test_client_without_auth_mode_is_refused(cluster):
    """The Ray 2.60 trap this suite works around: the token file alone is not enough for a client."""
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    proc = cluster.ray("job", "list", "--address", cluster.address, env=env)
    assert proc.returncode != 0
    assert "Missing authentication token" in proc.stdout + proc.stderr


def test_train_job_with_the_quickstart_config_and_its_relative_reader_path_then_serve_detached(cluster):
    """`jobs/encode.py` and `jobs/train.py configs/quickstart.yaml` as submitted jobs, with size and
    data-path overrides only: the config's relative `model.generator: raggen/assets/reader` must
    resolve in the job's working dir on the driver (Train workers start elsewhere). Then the trained
    models are served with `raggen serve --detach` on the same cluster."""
    world, index, runs = cluster.root / "qs-world", cluster.root / "qs-index", cluster.root / "qs-runs"
    made = subprocess.run(
        [
            str(BIN / "raggen"),
            "world",
            "--config",
            "configs/quickstart.yaml",
            "--set",
            f"world.out_dir={world}",
            "--set",
            "world.num_entities=50",
        ],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    data = [
        f"world.out_dir={world}",
        f"index.passages={world / 'passages.tsv'}",
        f"index.output={index}",
        f"train.index={index}",
        f"train.train_file={world / 'train.jsonl'}",
        f"train.dev_file={world / 'dev.jsonl'}",
        f"train.storage_path={runs}",
    ]
    sizes = [
        "index.num_shards=1",
        "index.actor_num_cpus=0.5",
        "train.steps=2",
        "train.num_workers=1",
        "train.cpus_per_worker=0.5",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "train.eval_every=0",
    ]
    overrides = [arg for item in data + sizes for arg in ("--set", item)]

    sub_id, proc = _submit(cluster, "jobs/encode.py", "configs/quickstart.yaml", *overrides)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (index / "LATEST").is_file()

    sub_id, proc = _submit(cluster, "jobs/train.py", "configs/quickstart.yaml", *overrides)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert _status(cluster, sub_id) == "SUCCEEDED"
    final = runs / "quickstart" / "final"
    from raggen.index import read_latest
    from raggen.models.loading import fetch_model_dir

    exported = Path(fetch_model_dir(str(final / "query_encoder")))  # through final/LATEST, verified
    assert (exported / "config.json").is_file(), "the trained retriever was exported"
    assert "Repo id must be in the form" not in proc.stdout + proc.stderr

    # then serve what was trained as a user does: `raggen serve --detach` on the running cluster returns,
    # and the service answers `raggen ask` from another process after that command has exited
    port = _free_ports(1)[0]
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
    sets = [f"serve.index={index}", f"serve.model_dir={final}", f"serve.port={port}", "serve.replica_num_cpus=0.2"]
    serve_args = [arg for item in sets for arg in ("--set", item)]
    raggen = str(BIN / "raggen")
    try:
        served = subprocess.run([raggen, "serve", "configs/quickstart.yaml", "--detach", *serve_args], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
        assert served.returncode == 0, served.stderr[-3000:]
        question = json.loads((world / "dev.jsonl").read_text().splitlines()[0])["question"]
        asked = subprocess.run([raggen, "ask", question, "--url", f"http://127.0.0.1:{port}"], env=env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert asked.returncode == 0, asked.stderr[-3000:]
        answer = json.loads(asked.stdout)
        assert answer["passages"] and answer["index_version"] == read_latest(str(index)), answer
    finally:
        subprocess.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(); serve.shutdown()"],
                       env=env, capture_output=True, timeout=120)  # fmt: skip
