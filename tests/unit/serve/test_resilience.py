"""Fault rules without a running Ray: retries of model calls whose replica died, overload as 503 +
Retry-After, 413 before parsing, exposure refused at start, credentials refused in Serve args.
(tests/integration/test_faults.py does the same on a real Serve with real replica deaths.)"""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from raggen.errors import ConfigError
from raggen.serve.http_api import build_http_api
from raggen.serve.resilience import (
    RetryPolicy,
    ServiceUnavailable,
    call_with_retry,
    check_exposure,
    is_loopback,
)
from raggen.serve.schemas import AnswerRequest, RequestLimits

LIMITS = RequestLimits(max_question_chars=50, default_top_k=3, max_top_k=5, max_new_tokens=8)
FAST = RetryPolicy(attempts=3, backoff_s=0.0, retry_after_s=2.0)


class Calls:
    """``call()`` raises the queued errors one by one, then answers."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.count = 0

    async def __call__(self) -> str:
        self.count += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _run(coro):
    return asyncio.run(coro)


def test_a_dead_replica_is_retried_within_the_budget():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import ReplicaUnavailableError

    calls = Calls(ActorDiedError(), ReplicaUnavailableError("Retriever#x"))
    retried: list[str] = []
    assert _run(call_with_retry(calls, FAST, "retrieve", on_retry=retried.append)) == "ok"
    assert calls.count == 3 and retried == ["retrieve", "retrieve"]
    wrapped = RayTaskError("generate", "traceback", ActorDiedError())  # a chained call's upstream died
    assert _run(call_with_retry(Calls(wrapped), FAST, "generate")) == "ok"
    # out of attempts: 503 with Retry-After, not a 500
    dead = Calls(*[ActorUnavailableError("gone", None)] * 3)
    with pytest.raises(ServiceUnavailable, match="no replica answered after 3 attempts") as info:
        _run(call_with_retry(dead, FAST, "generate"))
    assert dead.count == 3 and info.value.retry_after_s == 2.0


def test_model_errors_are_not_retried_and_a_full_queue_is_503():
    from ray.serve.exceptions import BackPressureError

    failing = Calls(ValueError("bad input"))
    with pytest.raises(ValueError):
        _run(call_with_retry(failing, FAST, "generate"))
    assert failing.count == 1  # the model failed: retrying would fail the same way
    full = Calls(BackPressureError(num_queued_requests=4, max_queued_requests=4, retry_after_s=5))
    with pytest.raises(ServiceUnavailable, match="overloaded") as info:
        _run(call_with_retry(full, FAST, "retrieve"))
    assert full.count == 1 and info.value.retry_after_s == 5
    no_hint = Calls(BackPressureError(num_queued_requests=4, max_queued_requests=4))
    with pytest.raises(ServiceUnavailable) as info:
        _run(call_with_retry(no_hint, FAST, "retrieve"))
    assert info.value.retry_after_s == FAST.retry_after_s
    assert 0.0 <= RetryPolicy(backoff_s=0.1, max_backoff_s=0.3).delay_s(5) <= 0.3
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("raggen.example.com", False),
        (None, False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_exposure_fails_closed(caplog):
    check_exposure("127.0.0.1", None, False, token_env="RAGGEN_API_TOKEN")  # loopback: fine without a token
    check_exposure("0.0.0.0", "tok", False, token_env="RAGGEN_API_TOKEN")  # a token: fine anywhere
    with pytest.raises(ConfigError, match=r"serve\.host.*RAGGEN_API_TOKEN.*serve\.allow_unauthenticated"):
        check_exposure("0.0.0.0", None, False, token_env="RAGGEN_API_TOKEN")
    with pytest.raises(ConfigError, match="unknown address"):  # cannot tell: counts as exposed
        check_exposure(None, None, False, token_env="RAGGEN_API_TOKEN")
    caplog.clear()
    check_exposure("0.0.0.0", None, True, token_env="RAGGEN_API_TOKEN")
    assert any(r.levelname == "WARNING" and "without an API token" in r.getMessage() for r in caplog.records)


def test_raggen_serve_refuses_an_open_non_loopback_host_before_starting(monkeypatch):
    from raggen.app.serving import check_serve_exposure, serve_from_config
    from raggen.config import load_config

    monkeypatch.delenv("RAGGEN_API_TOKEN", raising=False)
    cfg = load_config(None, ["serve.host=0.0.0.0"])
    with pytest.raises(ConfigError, match=r"serve\.host.*serve\.allow_unauthenticated"):
        serve_from_config(cfg, blocking=False)  # raises before Ray is started
    check_serve_exposure(load_config(None, ["serve.host=0.0.0.0", "serve.allow_unauthenticated=true"]))
    monkeypatch.setenv("RAGGEN_API_TOKEN", "tok")
    check_serve_exposure(cfg)


# ---------------------------------------------------------------------------------- HTTP


class Service:
    def __init__(self, fail: BaseException | None = None):
        self.fail = fail

    async def answer(self, req: AnswerRequest) -> dict:
        if self.fail is not None:
            raise self.fail
        return {"answer": "a", "passages": [], "index_version": "v1", "timings_ms": {"total": 1.0}}

    async def index_info(self) -> dict:
        return {
            "version": "v2",
            "index": "s3://private-bucket/idx",
            "num_passages": 3,
            "loaded_at": 0.0,
            "requested": "s3://private-bucket/idx@v3",
            "last_error": "refused s3://private-bucket/idx v3: sha256",
            "latest": "v3",
            "serving_fallback": True,
            "replica": "Retriever#a",
        }


def test_bodies_over_the_limit_get_413_before_parsing():
    http = TestClient(build_http_api(Service(), LIMITS, None, max_body_bytes=2048))
    r = http.post("/v1/answer", content=b"{" + b" " * 4096 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"].startswith("body:") and "2048" in r.json()["error"]

    def chunks():  # no Content-Length: the streamed bytes are counted
        yield b'{"question": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}'

    r = http.post("/v1/answer", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert http.post("/v1/answer", json={"question": "q"}).status_code == 200  # small bodies still pass
    r = http.post("/v1/chat/completions", content=b"x" * 3000, headers={"content-type": "application/json"})
    assert r.status_code == 413  # every route


def test_overload_is_503_with_retry_after():
    http = TestClient(build_http_api(Service(ServiceUnavailable("generate: overloaded, queue full", 3)), LIMITS, None))
    for r in (
        http.post("/v1/answer", json={"question": "q"}),
        http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "q"}]}),
    ):
        assert r.status_code == 503 and r.headers["retry-after"] == "3" and r.json()["request_id"], r.text


def test_index_internals_only_for_callers_allowed_to_see_them():
    open_remote = TestClient(build_http_api(Service(), LIMITS, None))  # no token, exposed: hidden
    info = open_remote.get("/v1/index").json()
    assert info["index"] is None and "private-bucket" not in str(info)
    assert (info["version"], info["latest"], info["serving_fallback"], info["requested"]) == ("v2", "v3", True, "v3")
    # what the Ingress sets when it listens on loopback
    loopback = TestClient(build_http_api(Service(), LIMITS, None, show_details=True))
    assert loopback.get("/v1/index").json()["index"] == "s3://private-bucket/idx"
    authed = TestClient(build_http_api(Service(), LIMITS, "tok"))
    assert authed.get("/v1/index").status_code == 401
    info = authed.get("/v1/index", headers={"Authorization": "Bearer tok"}).json()
    assert info["index"] == "s3://private-bucket/idx" and "sha256" in info["last_error"]


def test_docs_and_schema_sit_behind_the_token_and_declare_it():
    http = TestClient(build_http_api(Service(), LIMITS, "tok"))
    assert http.get("/docs").status_code == 401 and http.get("/openapi.json").status_code == 401
    good = {"Authorization": "Bearer tok"}
    assert http.get("/docs", headers=good).status_code == 200
    schema = http.get("/openapi.json", headers=good).json()
    scheme = schema["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert schema["security"] == [{"bearerAuth": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []  # the one open route
    assert "security" not in schema["paths"]["/v1/answer"]["post"]  # the global requirement applies


# ---------------------------------------------------------------------------------- app args


def test_serve_args_refuse_s3_credentials_and_carry_the_fault_settings():
    from raggen.app.serving import app_args_from_config
    from raggen.config import load_config
    from raggen.serve.app import build_app, parse_app_args, serve_deploy_config

    for key in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        with pytest.raises(ConfigError, match=rf"args\.s3.*{key}.*environment"):
            parse_app_args({"index": "/i", "generator": "/g", "s3": {"endpoint_url": "http://x", key: "k"}})
    cfg = load_config(
        None,
        [
            "serve.retry_attempts=5",
            "serve.max_queued_requests=7",
            "serve.retry_after_s=4",
            "serve.max_body_bytes=4096",
            "serve.allow_unauthenticated=true",
            "serve.request_timeout_s=30",
            "serve.drain_poll_s=0.25",
        ],
    )
    args = app_args_from_config(cfg)
    a = parse_app_args(args)
    assert (a.retry_attempts, a.max_queued_requests, a.retry_after_s, a.max_body_bytes, a.allow_unauthenticated) == (
        5,
        7,
        4.0,
        4096,
        True,
    )
    from raggen.app.serving import _deploy_config_of

    assert _deploy_config_of(cfg)["http_options"]["request_timeout_s"] == 30
    assert serve_deploy_config({"index": "/i", "generator": "/g"})["http_options"]["request_timeout_s"] > 0
    app = build_app(args)
    ingress = app._bound_deployment
    assert ingress._deployment_config.max_queued_requests == 7
    assert ingress._deployment_config.backpressure_config.retry_after_s == 4
    assert ingress.init_kwargs["retry"] == {"attempts": 5, "backoff_s": 0.1, "retry_after_s": 4.0}
    assert ingress.init_kwargs["allow_unauthenticated"] is True and ingress.init_kwargs["max_body_bytes"] == 4096
    retriever = ingress.init_args[0]._bound_deployment
    assert retriever._deployment_config.max_queued_requests == 7 and retriever.init_kwargs["retry_attempts"] == 5
    # every deployment polls its drain at the configured period (Serve's default is 2 s)
    generator = ingress.init_args[1]._bound_deployment
    for deployment in (ingress, retriever, generator):
        assert deployment._deployment_config.graceful_shutdown_wait_loop_s == 0.25


# ---------------------------------------------------------------------------------- client


def test_client_resends_what_a_dead_ingress_or_a_full_queue_refused(monkeypatch):
    import httpx

    from raggen.serve import client as client_module
    from raggen.serve.client import ServiceError, ask

    waits: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    replies = [
        httpx.Response(500, text="Internal Server Error"),  # Serve's proxy: the Ingress replica died
        httpx.Response(503, headers={"Retry-After": "3"}, json={"error": "server: overloaded"}),
        httpx.Response(200, json={"answer": "a", "passages": [], "index_version": "v1", "timings_ms": {}}),
    ]
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        reply = replies.pop(0)
        seen.append(reply.status_code)
        return reply

    http = httpx.Client(transport=httpx.MockTransport(handler))
    assert ask("http://svc", "q", client=http)["answer"] == "a"
    assert seen == [500, 503, 200] and waits == [0.2, 3.0]  # Retry-After honoured
    own_500 = httpx.Response(500, json={"error": "server: internal error", "request_id": "r1"})
    replies[:] = [own_500, own_500]
    with pytest.raises(ServiceError, match="500"):
        ask("http://svc", "q", client=http)  # raggen's own internal error: not sent again
    assert len(replies) == 1
    replies[:] = [httpx.Response(503, headers={"Retry-After": "60"}, json={"error": "x"})] * 3
    waits.clear()
    with pytest.raises(ServiceError, match="503"):
        ask(
            "http://svc",
            "q",
            client=http,
        )
    assert waits == [5.0, 5.0]  # bounded: at most max_wait_s per wait, 2 resends


def test_a_stream_whose_generator_replica_dies_restarts_without_repeating_text():
    from ray.exceptions import ActorDiedError

    from raggen.serve import ingress as serve_ingress

    user_class = next(c for c in serve_ingress.Ingress.func_or_class.__mro__ if "__serve_build_asgi_app__" in vars(c))
    ingress = user_class.__new__(user_class)  # no __init__: it asks Serve's controller for the host
    attempts: list[int] = []

    class Stream:
        def remote(self, *args):
            attempts.append(1)
            first = len(attempts) == 1

            async def items():
                for piece in ("Par", "is", " is"):
                    if first and piece == " is":
                        raise ActorDiedError()  # the Generator replica died mid-answer
                    yield {"delta": piece}
                yield {"text": "Paris is", "completion_tokens": 3, "finish_reason": "stop"}

            return items()

    ingress.generator_stream = type("Handle", (), {"generate_stream": Stream()})()
    ingress.retry = FAST
    req = AnswerRequest(question="q", top_k=1, max_new_tokens=4, num_beams=1)

    async def collect() -> list[dict]:
        return [item async for item in ingress._stream_generation(req, [])]

    items = asyncio.run(collect())
    assert len(attempts) == 2
    assert [i["delta"] for i in items if "delta" in i] == ["Par", "is", " is"]  # nothing sent twice
    assert items[-1]["text"] == "Paris is"
