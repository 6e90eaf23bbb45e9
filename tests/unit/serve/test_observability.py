"""Watching the service without Ray: one JSON access-log line per request with its request id,
the request hook the metrics hang on, the index holder's swap/refusal hooks, and what the metric
recorders write (Ray's metric classes replaced by recording fakes)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

import raggen.serve.metrics as serve_metrics
from raggen.errors import IndexIntegrityError
from raggen.serve.http_api import ACCESS_LOGGER, build_http_api
from raggen.serve.index_holder import IndexHolder
from raggen.serve.live_index import LiveIndex
from raggen.serve.schemas import AnswerRequest, RequestLimits

LIMITS = RequestLimits(max_question_chars=50, default_top_k=3, max_top_k=5, max_new_tokens=8)


class Service:
    def __init__(self, fail: Exception | None = None):
        self.fail = fail

    async def answer(self, req: AnswerRequest) -> dict:
        if self.fail is not None:
            raise self.fail
        return {"answer": "a", "passages": [], "index_version": "v1", "timings_ms": {"total": 1.0}}

    async def index_info(self) -> dict:
        return {"version": "v1", "index": "/idx", "num_passages": 3, "loaded_at": 0.0}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture()
def access_lines():
    handler = Lines()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def test_one_json_access_line_per_request_with_its_request_id(access_lines):
    entries: list[dict] = []
    http = TestClient(build_http_api(Service(), LIMITS, "tok", on_request=entries.append))
    good = {"Authorization": "Bearer tok"}
    r1 = http.post("/v1/answer", json={"question": "q"}, headers=good)
    r2 = http.post("/v1/answer", json={"question": "q"})  # 401: logged too
    r3 = http.get("/v1/index", headers={**good, "X-Request-Id": "from-the-caller"})
    r4 = http.get("/no/such/route", headers=good)
    r5 = http.post("/v1/answer", json={"top_k": 0}, headers=good)
    assert [r.status_code for r in (r1, r2, r3, r4, r5)] == [200, 401, 200, 404, 422]
    assert len(access_lines) == 5
    logged = [json.loads(line) for line in access_lines]  # each line is one JSON object
    assert logged == entries
    assert [e["status"] for e in logged] == [200, 401, 200, 404, 422]
    assert [e["route"] for e in logged] == ["/v1/answer", "/v1/answer", "/v1/index", "other", "/v1/answer"]
    assert logged[3]["path"] == "/no/such/route"
    for e, r in zip(logged, (r1, r2, r3, r4, r5)):
        if r is not r3:
            assert r.headers.get_list("x-request-id") == [e["request_id"]]  # returned once
    # a caller's (or Serve proxy's) id is used as is and not echoed a second time (Serve's proxy returns it)
    assert logged[2]["request_id"] == "from-the-caller" and "x-request-id" not in r3.headers
    assert len({e["request_id"] for e in logged}) == 5
    assert all(e["type"] == "access" and e["latency_ms"] >= 0 and e["time"].endswith("Z") for e in logged)
    assert [e["method"] for e in logged] == ["POST", "POST", "GET", "GET", "POST"]


def test_internal_errors_carry_the_request_id(access_lines):
    http = TestClient(build_http_api(Service(fail=RuntimeError("boom\nsecret detail")), LIMITS, None))
    r = http.post("/v1/answer", json={"question": "q"})
    assert r.status_code == 500 and r.json()["error"] == "server: internal error"
    assert r.json()["request_id"] == r.headers["x-request-id"] == json.loads(access_lines[-1])["request_id"]
    assert "secret" not in r.text and "boom" not in r.text and "RuntimeError" not in r.text


def test_a_failing_hook_does_not_fail_the_request(access_lines):
    def broken(entry: dict) -> None:
        raise RuntimeError("metrics backend down")

    http = TestClient(build_http_api(Service(), LIMITS, None, on_request=broken))
    assert http.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------- index hooks


def _live(version: str) -> LiveIndex:
    return LiveIndex(root="/idx", version=version, index=object(), num_passages=1, loaded_at=0.0)


def test_holder_reports_swaps_and_refusals():
    corrupt = {"v3"}
    events: list[tuple] = []

    def load(root: str, version: str | None) -> LiveIndex:
        if version in corrupt:
            raise IndexIntegrityError(f"{root}/{version}: sha256 mismatch")
        return _live(version or "v1")

    holder = IndexHolder(
        load,
        lambda root: "v1",
        on_swap=lambda old, new: events.append(("swap", old and old.version, new.version)),
        on_refuse=lambda msg: events.append(("refuse", msg.split(":")[0])),
    )
    assert holder.configure("/idx")
    assert holder.swap_to("/idx", "v2") and holder.swap_to("/idx", "v2")  # the second is a no-op
    assert not holder.swap_to("/idx", "v3")
    holder.refuse("invalid Retriever user_config")
    assert events == [
        ("swap", None, "v1"),
        ("swap", "v1", "v2"),
        ("refuse", "refused /idx version v3"),
        ("refuse", "invalid Retriever user_config"),
    ]

    def broken(*args) -> None:
        raise RuntimeError("metrics down")

    quiet = IndexHolder(load, lambda root: "v1", on_swap=broken, on_refuse=broken)
    assert quiet.configure("/idx") and quiet.swap_to("/idx", "v2") and not quiet.swap_to("/idx", "v3")
    assert quiet.live.version == "v2"  # a failing hook changes nothing that is served


# ---------------------------------------------------------------------------------- recorders


class FakeMetric:
    def __init__(self, name: str, description: str = "", boundaries=None, tag_keys: tuple = ()):
        self.name, self.tag_keys, self.boundaries = name, tag_keys, boundaries
        self.calls: list[tuple[float, dict]] = []
        created[name] = self

    def _record(self, value: float, tags: dict | None = None) -> None:
        tags = tags or {}
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        self.calls.append((value, tags))

    inc = set = observe = _record


created: dict[str, FakeMetric] = {}


@pytest.fixture()
def fake_metrics(monkeypatch):
    created.clear()
    fake = SimpleNamespace(Counter=FakeMetric, Gauge=FakeMetric, Histogram=FakeMetric)
    monkeypatch.setattr(serve_metrics, "_metrics", lambda: fake)
    return created


def test_index_metrics_label_the_live_version(fake_metrics):
    m = serve_metrics.IndexMetrics()
    m.on_swap(None, _live("v1"))
    m.on_swap(_live("v1"), _live("v2"))
    m.on_refuse("refused /idx version v3: sha256")
    gauge = fake_metrics[serve_metrics.INDEX_VERSION]
    assert gauge.calls == [(1, {"version": "v1"}), (0, {"version": "v1"}), (1, {"version": "v2"})]
    assert len(fake_metrics[serve_metrics.INDEX_SWAPS].calls) == 1  # the first load is not a swap
    assert len(fake_metrics[serve_metrics.INDEX_SWAPS_REFUSED].calls) == 1


def test_http_stage_and_batch_metrics(fake_metrics):
    http = serve_metrics.HttpMetrics()
    http.request("/v1/answer", "POST", 200, 12.5)
    assert fake_metrics[serve_metrics.HTTP_REQUESTS].calls == [
        (1, {"route": "/v1/answer", "method": "POST", "status": "200"})
    ]
    assert fake_metrics[serve_metrics.HTTP_LATENCY].calls == [(12.5, {"route": "/v1/answer"})]
    serve_metrics.StageMetrics().observe({"retrieve": 3.0, "generate": 40.0, "total": 44.0})
    assert fake_metrics[serve_metrics.STAGE_LATENCY].calls == [
        (3.0, {"stage": "retrieve"}),
        (40.0, {"stage": "generate"}),
    ]
    serve_metrics.BatchMetrics("generate").observe(4)
    assert fake_metrics[serve_metrics.BATCH_SIZE].calls == [(4.0, {"stage": "generate"})]
    names = [m.name for m in fake_metrics.values()]
    assert all(n.startswith("raggen_") for n in names)  # scraped as ray_raggen_* (Ray's prefix)
