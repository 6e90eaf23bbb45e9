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
import shlex
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
AGENT_WAIT_S = 60
START_ATTEMPTS = 3
STARTED_LINE = "This command will now block forever"  # what `ray start --block` prints once the node is up
EXCLUDES = [".venv", ".git", "artifacts", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache"]


@dataclass
class Cluster:
    address: str  # the dashboard / job API: http://127.0.0.1:PORT
    gcs_address: str  # what ray.init / RAY_ADDRESS take: 127.0.0.1:PORT
    env: dict[str, str]
    root: Path
    log: Path  # the `ray start` output
    ray_dir: Path  # its --temp-dir

    def ray(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(RAY), *args], env=env or self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )

    def log_tails(self, chars: int = 4000) -> str:
        """The ends of the head's own output and of its dashboard's and raylet's logs: attached to a
        failed test's report (tests/integration/conftest.py), since the fixture deletes them."""
        logs = self.ray_dir / "session_latest" / "logs"
        names = ["dashboard.log", "dashboard.err", "dashboard_JobHead.log", "dashboard_agent.log", "raylet.out"]
        parts = []
        for path in [self.log, *(logs / name for name in names)]:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"----- {path.name} (last {chars} chars)\n{text[-chars:]}")
        return "\n".join(parts) or f"no logs under {logs}"


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


def _start_head(root: Path, env: dict[str, str], attempt: int) -> tuple[subprocess.Popen, Cluster]:
    """`ray start --head --block` on fresh ports and its own temp dir; returns at once."""
    gcs, dash, client, agent = _free_ports(4)
    log = root / f"head-{attempt}.log"
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
        f"--temp-dir={root / f'ray-{attempt}'}",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, Cluster(address=f"http://127.0.0.1:{dash}", gcs_address=f"127.0.0.1:{gcs}", env=env, root=root,
                         log=log, ray_dir=root / f"ray-{attempt}")  # fmt: skip


def _wait_started(proc: subprocess.Popen, c: Cluster) -> str | None:
    """None once the node is up and its job API answers; else why not (the start failed or timed out).

    The head's job API answers before its raylet is up: `ray start` prints its block line only once
    the whole node started. A raylet gives its dashboard agent 15 s per port file and then exits
    (Ray 2.60; `RAY_agent_register_timeout_ms` does not change it); on this CPU-bound suite an agent
    took 36 s to start while the other test process deployed Serve apps, so the node died after its
    job API had answered."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            return f"ray start exited with {proc.returncode}"
        started = STARTED_LINE in c.log.read_text(errors="replace")
        if started and _job_api_answers(c.address) and c.ray("job", "list", "--address", c.address).returncode == 0:
            return None
        if time.monotonic() > deadline:
            return f"the node or its job API did not come up in {START_TIMEOUT_S}s"
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster(no_shared_ray):
    """A token-auth head on this machine; a start that fails (see ``_wait_started``) is retried on
    new ports, up to ``START_ATTEMPTS`` times, each failure's logs printed if all fail."""
    assert RAY.exists(), f"no ray CLI beside {sys.executable}: ray[default] is a dependency; the install is broken"
    root = Path(tempfile.mkdtemp(prefix="rgj-", dir="/tmp"))  # short: Ray's unix sockets live below
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _cluster_env(token)
    proc, failures = None, []
    try:
        for attempt in range(START_ATTEMPTS):
            proc, c = _start_head(root, env, attempt)
            why = _wait_started(proc, c)
            if why is None:
                break
            _stop(proc)
            failures.append(f"attempt {attempt + 1}: {why}\n{c.log_tails(2000)}")
        else:
            pytest.fail("\n\n".join(failures))
        yield c
    finally:
        if proc is not None:
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
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            proc = c.ray(*cmd, timeout=JOB_TIMEOUT_S)
            # a head that has just started answers the job API before its job agent registers
            if "No available agent to submit job" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
                return sub_id, proc
            time.sleep(1)
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


def _raggen(cluster: Cluster, *args: str, env: dict[str, str] | None = None, timeout: float = 240):
    """The raggen CLI from the repo root, as a user runs it beside the cluster."""
    return subprocess.run([str(BIN / "raggen"), *args], cwd=REPO, env=env or cluster.env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_quickstart_rehearsal_step_by_step_as_jobs_then_serve_detached(cluster):
    """The quickstart config's dry run (issue #11: encode with Ray Data -> index -> 2 training steps on 2
    Ray Train workers -> eval -> Serve answers over HTTP) run the way the README's step-by-step
    rehearsal runs it: the ``--set`` lines of ``raggen dry-run --print-overrides``, then
    ``jobs/encode.py`` and ``jobs/train.py`` as submitted jobs, ``raggen eval`` and ``raggen serve
    --detach`` + ``raggen ask`` on the running cluster. (``test_dry_run_configs`` runs the other
    configs' rehearsals in process; the quickstart's is here, where its job path is tested too.)

    The config's relative ``model.generator: raggen/assets/reader`` must resolve in the job's working
    dir on the driver (Train workers start elsewhere); the served models are the trained ones."""
    from raggen.config import load_config
    from raggen.index import read_latest, verify_index
    from raggen.models.loading import fetch_model_dir
    from raggen.train.metrics import read_metrics

    config = "configs/quickstart.yaml"
    printed = _raggen(cluster, "dry-run", config, "--out", str(cluster.root / "qs"), "--print-overrides", timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    lines = [shlex.split(line)[1] for line in printed.stdout.splitlines() if line.startswith("--set ")]
    assert "train.num_workers=2" in lines and "train.steps=2" in lines, printed.stdout
    overrides = [arg for item in lines for arg in ("--set", item)]
    cfg = load_config(REPO / config, lines)

    made = _raggen(cluster, "world", "--config", config, *overrides, "--set", "world.num_entities=130", timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]

    sub_id, proc = _submit(cluster, "jobs/encode.py", config, *overrides)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    manifest = verify_index(cfg.index.output)
    assert manifest.num_passages > 200 and len(manifest.shards) == 2, manifest
    assert (manifest.encoder.pooling, manifest.encoder.passage_format) == ("mean", "joined")

    sub_id, proc = _submit(cluster, "jobs/train.py", config, *overrides)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert _status(cluster, sub_id) == "SUCCEEDED"
    assert "Repo id must be in the form" not in proc.stdout + proc.stderr
    final = Path(cfg.train.storage_path) / "quickstart" / "final"
    exported = Path(fetch_model_dir(str(final / "query_encoder")))  # through final/LATEST, verified
    assert (exported / "config.json").is_file(), "the trained retriever was exported"
    steps, _ = read_metrics(Path(cfg.train.storage_path) / "quickstart" / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2]

    evaluated = _raggen(cluster, "eval", config, *overrides, "--checkpoint", str(final), "--split", "dev")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scores = json.loads(evaluated.stdout)
    assert scores["index_version"] == manifest.version, scores
    assert all(0.0 <= scores[k] <= 1.0 for k in scores if k.startswith(("em", "f1", "recall")))

    # then serve what was trained as a user does: `raggen serve --detach` on the running cluster returns,
    # and the service answers `raggen ask` from another process after that command has exited
    port = _free_ports(1)[0]
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
    serve_args = ["--set", f"serve.model_dir={final}", "--set", f"serve.port={port}"]
    try:
        served = _raggen(cluster, "serve", config, "--detach", *overrides, *serve_args, env=env)
        assert served.returncode == 0, served.stderr[-3000:]
        question = json.loads(Path(cfg.train.dev_file).read_text().splitlines()[0])["question"]
        asked = _raggen(cluster, "ask", question, "--url", f"http://127.0.0.1:{port}", env=env, timeout=120)
        assert asked.returncode == 0, asked.stderr[-3000:]
        answer = json.loads(asked.stdout)
        assert answer["passages"] and answer["index_version"] == read_latest(cfg.index.output) == manifest.version
    finally:
        subprocess.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(); serve.shutdown()"],
                       env=env, capture_output=True, timeout=120)  # fmt: skip
