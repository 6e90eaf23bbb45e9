"""Faults on a real Ray Serve over real HTTP (loopback only): replica deaths under a steady stream,
a corrupt LATEST while the Retriever scales 1 -> 2, overload, oversized bodies, internal errors,
exposure and the token on /docs.

One small app for the module: a MiniLM index of a 20-entity world (v1, and v2 a copy of it), the
shipped reader, a tiny cross-encoder reranker, 2 replicas of every deployment (the Retriever starts
with 1 and scales to 2 in the LATEST test, which runs first), a bearer token, and small queues
(4 ongoing + 4 queued requests per deployment) so that overload is reached with a few dozen clients.
Tests run in file order and share the app. Every client call has a timeout and every stream a
request count and a wall-clock cap.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import ray
from ray import serve

from raggen.corpus import read_passages
from raggen.corpus.world import WorldConfig, read_changed_facts, write_world  # noqa: E402
from raggen.errors import ConfigError  # noqa: E402
from raggen.index import set_latest  # noqa: E402
from raggen.models import (
    TextEncoder,
    make_tiny_reranker,  # noqa: E402
)
from raggen.serve.app import APP_NAME, deploy_config, serve_deploy_config, wait_until_running  # noqa: E402
from raggen.testing import copy_version, wait_for
from tests.helpers import publish_encoded_index

_wait_for = functools.partial(wait_for, poll_s=0.5, retry_on=(httpx.HTTPError, ValueError, KeyError))

pytestmark = pytest.mark.integration

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SHIPPED_READER = str(Path(__file__).resolve().parents[2] / "raggen" / "assets" / "reader")
TOKEN = "faults-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL_DEPLOYMENTS = ("Retriever", "Reranker", "Generator")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("faults")
    files = write_world(out / "world", WorldConfig(num_entities=20, seed=1, changed_fraction=0.3))
    root = str(out / "index")
    # in this process: the Ray Data build has its own tests; this one tests what serves the index
    encoder = TextEncoder.from_pretrained(MINILM, pooling="mean", max_length=128)
    publish_encoded_index(read_passages(files.passages_v1), root, encoder, MINILM, out, num_shards=1)
    copy_version(root, "v1", "v2", tamper=False)
    set_latest(root, "v2")
    questions = [f.question for f in read_changed_facts(files.changed)][:6]
    return SimpleNamespace(out=out, root=root, questions=questions, reranker=make_tiny_reranker(str(out / "reranker")))


def _args(world, retriever_replicas: int) -> dict:
    return {
        "index": world.root,
        "watch_latest": True,
        "watch_interval_s": 0.5,
        "query_encoder": {"name_or_path": MINILM, "pooling": "mean", "max_length": 64},
        "generator": SHIPPED_READER,
        "reranker": world.reranker,
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


def _deploy(service, retriever_replicas: int) -> None:
    config = serve_deploy_config(
        _args(service.world, retriever_replicas),
        host="127.0.0.1",
        port=service.port,
        runtime_env={"env_vars": {"RAGGEN_API_TOKEN": TOKEN}},
        request_timeout_s=60,
    )
    deploy_config(config)
    service.config = config


@pytest.fixture(scope="module")
def service(world):
    service = SimpleNamespace(world=world, port=_free_port())
    _deploy(service, retriever_replicas=1)
    wait_until_running(timeout_s=400)
    service.url = f"http://127.0.0.1:{service.port}"
    service.http = httpx.Client(base_url=service.url, timeout=60, headers=AUTH)
    _wait_for(lambda: service.http.get("/healthz").status_code == 200, 60, "/healthz")
    yield service
    service.http.close()


def _running(name: str) -> int:
    app = serve.status().applications[APP_NAME]
    return int(app.deployments[name].replica_states.get("RUNNING", 0))


def _index_views(service, want: int, timeout_s: float = 60) -> dict[str, dict]:
    """``GET /v1/index`` until ``want`` distinct Retriever replicas have answered: replica -> info."""
    seen: dict[str, dict] = {}

    def enough() -> bool:
        info = service.http.get("/v1/index").json()
        seen[info["replica"]] = info
        return len(seen) >= want

    _wait_for(enough, timeout_s, f"{want} Retriever replicas in /v1/index", poll_s=0.1)
    return seen


# ---------------------------------------------------------------------------------- index faults


def test_corrupt_latest_while_scaling_serves_the_last_good_version(service):
    """LATEST moves to a version whose shard bytes are corrupt; the live replica keeps v2 and says
    it serves a fallback; a second replica started then (scale 1 -> 2) cannot verify LATEST either
    and serves the same v2; a good v4 published later is picked up by both (one version again)."""
    root = service.world.root
    _wait_for(lambda: service.http.get("/v1/index").json()["version"] == "v2", 60, "v2 served")
    copy_version(root, "v2", "v3", tamper=True)
    set_latest(root, "v3", verify=False)
    # the watcher reads LATEST, then verifies v3 (which takes a while under load): wait for its verdict
    info = _wait_for(
        lambda: (i := service.http.get("/v1/index").json())["latest"] == "v3" and i["last_error"] and i,
        60,
        "LATEST v3 seen and refused",
    )
    assert (info["version"], info["serving_fallback"]) == ("v2", True) and "sha256" in info["last_error"]

    _deploy(service, retriever_replicas=2)
    _wait_for(lambda: _running("Retriever") == 2, 240, "2 Retriever replicas")
    views = _index_views(service, want=2)
    for replica, info in views.items():
        assert (info["version"], info["latest"], info["serving_fallback"]) == ("v2", "v3", True), (replica, info)
    for question in service.world.questions[:2]:
        r = service.http.post("/v1/answer", json={"question": question})
        assert r.status_code == 200 and r.json()["index_version"] == "v2", r.text

    copy_version(root, "v1", "v4", tamper=False)
    set_latest(root, "v4")

    def converged() -> bool:
        views = _index_views(service, want=2, timeout_s=30)
        return all((i["version"], i["serving_fallback"]) == ("v4", False) for i in views.values())

    _wait_for(converged, 90, "both replicas on v4")


# ---------------------------------------------------------------------------------- replica deaths


def _replica_actor_names(deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def _kill_one_replica(deployment: str) -> str:
    name = _replica_actor_names(deployment)[0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


class Stream:
    """``clients`` threads sending /v1/answer back to back (bounded in count and time); every
    outcome is kept as (start, end, status or exception name)."""

    def __init__(
        self,
        url: str,
        questions: list[str],
        clients: int = 3,
        max_requests: int = 600,
        max_seconds: float = 150.0,
        raggen_client: bool = False,
    ):
        self.url, self.questions, self.raggen_client = url, questions, raggen_client
        self.max_requests, self.deadline = max_requests, time.monotonic() + max_seconds
        self.results: list[tuple[float, float, int | str]] = []
        self.raw_errors: list[float] = []  # when a 5xx came on the wire (raggen's client may resend it)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _send(self, http: httpx.Client, question: str) -> int | str:
        from raggen.errors import RaggenError
        from raggen.serve.client import ServiceError, ask

        if not self.raggen_client:
            return http.post("/v1/answer", json={"question": question}).status_code
        try:
            ask(self.url, question, token=TOKEN, client=http, timeout=60)
        except ServiceError as exc:
            return exc.status_code
        except RaggenError as exc:
            return type(exc).__name__
        return 200

    def _client(self, i: int) -> None:
        hooks = {"response": [lambda r: self.raw_errors.append(time.monotonic()) if r.status_code >= 500 else None]}
        with httpx.Client(base_url=self.url, timeout=60, headers=AUTH, event_hooks=hooks) as http:
            n = i
            while not self.stop.is_set() and len(self.results) < self.max_requests and time.monotonic() < self.deadline:
                question = self.questions[n % len(self.questions)]
                n += 1
                start = time.monotonic()
                try:
                    status = self._send(http, question)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.results.append((start, time.monotonic(), status))

    def __enter__(self) -> Stream:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def wait_for(self, count: int, timeout_s: float = 60) -> None:
        target = len(self.results) + count
        _wait_for(lambda: len(self.results) >= target, timeout_s, f"{count} more answers", poll_s=0.05)

    def in_flight_at(self, t: float) -> int:
        return sum(1 for start, end, _ in self.results if start < t < end)


def test_killing_a_replica_of_each_model_deployment_fails_no_request(service):
    """3 clients stream; one replica of the Retriever, the Reranker and the Generator is killed in
    turn (ray.kill, no restart: Serve replaces it); every request is answered with 200."""
    for name in ("Ingress", *MODEL_DEPLOYMENTS):
        _wait_for(lambda name=name: _running(name) == 2, 240, f"2 {name} replicas")
    kills: list[tuple[str, float]] = []
    with Stream(service.url, service.world.questions) as stream:
        stream.wait_for(6)
        for deployment in MODEL_DEPLOYMENTS:
            _kill_one_replica(deployment)
            kills.append((deployment, time.monotonic()))
            stream.wait_for(8)
    failed = [r for r in stream.results if r[2] != 200]
    assert not failed, f"{len(failed)} of {len(stream.results)} failed: {failed[:5]}"
    assert all(stream.in_flight_at(t) > 0 for _, t in kills), "a kill found no request in flight"
    assert service.http.get("/healthz").status_code == 200


def test_killing_an_ingress_replica_under_load(service):
    """The Ingress replica that dies takes its in-flight HTTP requests with it: Serve's proxy
    answers them 500 (its own plain-text body) and does not resend them. raggen's client
    (``raggen ask``, :mod:`raggen.serve.client`) resends those, so through it no request fails;
    on the wire at most the requests in flight on that replica saw the 500."""
    _wait_for(lambda: _running("Ingress") == 2, 240, "2 Ingress replicas")
    with Stream(service.url, service.world.questions, raggen_client=True) as stream:
        stream.wait_for(6)
        killed_at = time.monotonic()
        _kill_one_replica("Ingress")
        stream.wait_for(10)
    failed = [r for r in stream.results if r[2] != 200]
    wire = [round(t - killed_at, 2) for t in stream.raw_errors]  # seconds after the kill
    print(
        f"ingress kill: 5xx on the wire at {wire} s after the kill, {stream.in_flight_at(killed_at)} requests in "
        f"flight then, {len(stream.results)} answered through raggen's client"
    )
    assert not failed, failed
    # only the requests on (or just routed to) the dead replica saw a 5xx, and only right after the kill
    assert len(wire) <= 2 * 3 and all(0 <= t < 10 for t in wire), wire


# ---------------------------------------------------------------------------------- HTTP faults


def test_overload_beyond_the_queue_gets_503_with_retry_after_never_a_hang(service):
    outcomes: list[tuple[int | str, str | None, float]] = []

    def one(i: int) -> None:
        start = time.monotonic()
        try:
            with httpx.Client(base_url=service.url, timeout=60, headers=AUTH) as http:
                r = http.post("/v1/answer", json={"question": service.world.questions[i % 6], "max_new_tokens": 8})
                outcomes.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - start))
        except httpx.HTTPError as exc:
            outcomes.append((type(exc).__name__, None, time.monotonic() - start))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert len(outcomes) == 48 and not any(t.is_alive() for t in threads)
    statuses = [s for s, _, _ in outcomes]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0, statuses
    assert all(ra is not None and int(ra) >= 1 for s, ra, _ in outcomes if s == 503)
    rejected = [dt for s, _, dt in outcomes if s == 503]
    assert min(rejected) < 10, rejected  # turned away, not queued
    assert service.http.post("/v1/answer", json={"question": service.world.questions[0]}).status_code == 200


def test_a_1mb_body_gets_413(service):
    body = json.dumps({"question": "x" * (1 << 20)})
    r = service.http.post("/v1/answer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"].startswith("body:"), r.text[:200]
    r = httpx.post(f"{service.url}/v1/answer", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 401  # the token is checked first
    assert service.http.post("/v1/answer", json={"question": service.world.questions[0]}).status_code == 200


def test_docs_and_openapi_need_the_token(service):
    assert httpx.get(f"{service.url}/docs", timeout=30).status_code == 401
    assert httpx.get(f"{service.url}/openapi.json", timeout=30).status_code == 401
    assert service.http.get("/docs").status_code == 200
    schema = service.http.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert schema["security"] == [{"bearerAuth": []}]


def test_an_internal_error_is_500_with_a_request_id_and_no_internals(service):
    """A service whose answer raises (with a path and a bucket in the message), behind Serve's
    proxy: the client gets "internal error" and the request id, the log gets the rest."""
    from raggen.serve.http_api import build_http_api
    from raggen.serve.schemas import RequestLimits

    @serve.deployment(name="Broken", ray_actor_options={"num_cpus": 0.05})
    @serve.ingress()
    class Broken:
        def __serve_build_asgi_app__(self):
            return build_http_api(self, RequestLimits(), None)

        async def answer(self, req):
            raise RuntimeError("cannot read /srv/raggen/secret.bin from s3://private-bucket")

        async def index_info(self):
            raise KeyError("/srv/raggen/index")

    serve.run(Broken.bind(), name="broken", route_prefix="/broken")
    try:
        r = httpx.post(f"{service.url}/broken/v1/answer", json={"question": "q"}, timeout=60)
        assert r.status_code == 500 and r.json()["error"] == "server: internal error", r.text
        assert r.json()["request_id"] == r.headers["x-request-id"]
        for leak in ("RuntimeError", "secret", "private-bucket", "/srv"):
            assert leak not in r.text
        r = httpx.get(f"{service.url}/broken/v1/index", timeout=60)
        assert r.status_code == 500 and "KeyError" not in r.text and r.json()["request_id"]
    finally:
        serve.delete("broken")


def test_non_loopback_without_a_token_is_refused_at_start(service, monkeypatch):
    from raggen.app.serving import serve_from_config
    from raggen.config import load_config
    from raggen.serve import ingress as serve_ingress

    monkeypatch.delenv("RAGGEN_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"serve\.host.*serve\.allow_unauthenticated"):
        serve_from_config(load_config(None, ["serve.host=0.0.0.0"]), blocking=False)
    assert serve_ingress.serving_host() == "127.0.0.1"  # what the Ingress asks Serve's controller

    class Handle:
        def options(self, **kw):
            return self

    # the class as written (Serve's ingress wrapper subclasses it with an async __init__)
    ingress = next(c for c in serve_ingress.Ingress.func_or_class.__mro__ if "__serve_build_asgi_app__" in vars(c))
    ingress(Handle(), Handle())  # loopback (this Serve): starts without a token
    monkeypatch.setattr(serve_ingress, "serving_host", lambda: "0.0.0.0")
    with pytest.raises(ConfigError, match=r"serve\.host.*'0\.0\.0\.0'.*RAGGEN_API_TOKEN"):
        ingress(Handle(), Handle())
    ingress(Handle(), Handle(), allow_unauthenticated=True)  # explicitly open: a warning, not an error
    monkeypatch.setenv("RAGGEN_API_TOKEN", "tok")
    ingress(Handle(), Handle())
