"""The HTTP contract without Ray: request validation (types + config bounds), auth, error bodies,
the index holder's swap/refuse rules, and the app args / Serve config builders."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from raggen.serve.deployments import NoIndexError, build_http_api
from raggen.serve.schemas import AnswerRequest, RequestLimits

LIMITS = RequestLimits(max_question_chars=50, default_top_k=3, max_top_k=5, max_new_tokens=8)


# ---------------------------------------------------------------------------------- HTTP API


class EchoService:
    """Stands in for the Serve graph: answers with the request it got, so tests see what passed validation."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail

    async def answer(self, req: AnswerRequest) -> dict:
        if self.fail is not None:
            raise self.fail
        return {
            "answer": f"{req.decoding}/{req.top_k}/{req.max_new_tokens}",
            "passages": [{"id": "p1", "title": "T", "text": "t", "score": 1.5}],
            "index_version": "v1",
            "timings_ms": {"total": 1.0},
        }

    async def index_info(self) -> dict:
        if self.fail is not None:
            raise self.fail
        return {"version": "v1", "index": "/idx", "num_passages": 3, "loaded_at": 0.0}


def client(service=None, token=None) -> TestClient:
    return TestClient(build_http_api(service or EchoService(), LIMITS, token))


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "question"),
        ({"question": ""}, "question"),
        ({"question": "x" * 51}, "question"),
        ({"question": "q", "top_k": 0}, "top_k"),
        ({"question": "q", "top_k": 6}, "top_k"),
        ({"question": "q", "top_k": "three"}, "top_k"),
        ({"question": "q", "decoding": "beam"}, "decoding"),
        ({"question": "q", "max_new_tokens": 9}, "max_new_tokens"),
        ([1, 2], "body"),
    ],
)
def test_invalid_answer_requests_get_422_naming_the_field(body, field):
    c = client()
    r = c.post("/v1/answer", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(f"{field}:"), r.json()
    assert c.post("/v1/answer", json={"question": "q"}).status_code == 200  # still answers


def test_bad_json_and_content_type():
    c = client()
    r = c.post("/v1/answer", content=b'{"question": "q"', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"].startswith("body:")
    r = c.post("/v1/answer", content=b'{"question": "q"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "content-type" in r.json()["error"]
    r = c.post("/v1/answer", content=b'{"question": "q"}', headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_defaults_and_success_body():
    r = client().post("/v1/answer", json={"question": "q", "decoding": "rag-sequence-thorough"})
    assert r.status_code == 200
    body = r.json()
    assert body["answer"] == "rag-sequence-thorough/3/8"  # service defaults filled in before the graph
    assert set(body) == {"answer", "passages", "index_version", "timings_ms"}
    assert set(body["passages"][0]) == {"id", "title", "text", "score"}


def test_token_guards_every_route_but_healthz():
    c = client(token="s3cret")
    assert c.get("/healthz").status_code == 200
    calls = {
        "/v1/index": lambda **kw: c.get("/v1/index", **kw),
        "/v1/answer": lambda **kw: c.post("/v1/answer", json={"question": "q"}, **kw),
    }
    for path, call in calls.items():
        r = call()
        assert r.status_code == 401 and "authorization" in r.json()["error"], path
        r = call(headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
    good = {"Authorization": "Bearer s3cret"}
    assert c.get("/v1/index", headers=good).json()["version"] == "v1"
    assert c.post("/v1/answer", json={"question": "q"}, headers=good).status_code == 200
    # the token check comes first: an unauthenticated bad request is a 401, not a 422
    assert c.post("/v1/answer", json={"top_k": 0}).status_code == 401


def test_service_failures_are_one_line_errors_without_internals():
    c = client(EchoService(fail=NoIndexError("no verified index loaded (last error: /secret/root v3: sha256)")))
    r = c.post("/v1/answer", json={"question": "q"})
    assert r.status_code == 503 and r.json()["error"].startswith("index:") and int(r.headers["retry-after"]) >= 0
    assert "/secret/root" not in r.text and r.json()["request_id"]  # no token, not loopback: hidden
    assert c.get("/v1/index").status_code == 503
    shown = client(EchoService(fail=NoIndexError("no verified index (last error: /secret/root)")), token="t")
    r = shown.get("/v1/index", headers={"Authorization": "Bearer t"})  # an authenticated caller sees why
    assert r.status_code == 503 and "/secret/root" in r.json()["error"]
    r = client(EchoService(fail=RuntimeError("boom /etc/raggen\nsecond line"))).post(
        "/v1/answer", json={"question": "q"}
    )
    assert r.status_code == 500 and r.json()["error"] == "server: internal error"
    assert r.json()["request_id"] and "RuntimeError" not in r.text and "boom" not in r.text
