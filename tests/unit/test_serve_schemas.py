"""The HTTP contract without Ray: request validation (types + config bounds), auth, error bodies,
the index holder's swap/refuse rules, and the app args / Serve config builders."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.serve.auth import bearer_token, is_authorized
from raggen.serve.deployments import IndexHolder, IndexUserConfig, LiveIndex, NoIndexError, build_http_api
from raggen.serve.schemas import AnswerRequest, RequestLimits, check_limits, resolve_defaults, summarize_issues

REPO = Path(__file__).resolve().parents[2]
LIMITS = RequestLimits(max_question_chars=50, default_top_k=3, max_top_k=5, max_new_tokens=8)


# ---------------------------------------------------------------------------------- schemas


def test_request_types_are_strict_and_fields_known():
    ok = AnswerRequest.model_validate({"question": "who?", "top_k": 2, "decoding": "rag-sequence-fast"})
    assert (ok.top_k, ok.decoding, ok.max_new_tokens) == (2, "rag-sequence-fast", None)
    for body, field in [
        ({"question": "who?", "top_k": "2"}, "top_k"),
        ({"question": "who?", "top_k": True}, "top_k"),
        ({"question": "who?", "top_k": 0}, "top_k"),
        ({"question": "who?", "max_new_tokens": 2.5}, "max_new_tokens"),
        ({"question": "   "}, "question"),
        ({"question": 7}, "question"),
        ({}, "question"),
        ({"question": "who?", "decoding": "greedy"}, "decoding"),
        ({"question": "who?", "topk": 3}, "topk"),
        ({"question": "who?", "num_beams": 0}, "num_beams"),
        ({"question": "who?", "num_beams": "1"}, "num_beams"),
    ]:
        with pytest.raises(ValidationError) as info:
            AnswerRequest.model_validate(body)
        assert [e["loc"][0] for e in info.value.errors()] == [field], body


def test_limits_name_each_broken_field_and_defaults_fill_in():
    req = AnswerRequest(question="x" * 51, top_k=6, max_new_tokens=9)
    issues = check_limits(req, LIMITS)
    assert [i["loc"] for i in issues] == [["body", "question"], ["body", "top_k"], ["body", "max_new_tokens"]]
    assert summarize_issues(issues).startswith("question: must be at most 50 characters")
    edge = AnswerRequest(question="x" * 50, top_k=5, max_new_tokens=8)
    assert check_limits(edge, LIMITS) == []
    filled = resolve_defaults(AnswerRequest(question="q"), LIMITS)
    assert (filled.top_k, filled.max_new_tokens, filled.num_beams) == (3, 8, LIMITS.max_num_beams)
    too_wide = check_limits(AnswerRequest(question="q", num_beams=LIMITS.max_num_beams + 1), LIMITS)
    assert [i["loc"] for i in too_wide] == [["body", "num_beams"]]
    with pytest.raises(ValueError, match="default_top_k"):
        RequestLimits(default_top_k=6, max_top_k=5)


def test_bearer_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    assert is_authorized("Bearer s3cret", "s3cret") and not is_authorized("Bearer s3cre", "s3cret")


# ---------------------------------------------------------------------------------- HTTP API


class EchoService:
    """Stands in for the Serve graph: answers with the request it got, so tests see what passed validation."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail

    async def answer(self, req: AnswerRequest) -> dict:
        if self.fail is not None:
            raise self.fail
        return {"answer": f"{req.decoding}/{req.top_k}/{req.max_new_tokens}",
                "passages": [{"id": "p1", "title": "T", "text": "t", "score": 1.5}],
                "index_version": "v1", "timings_ms": {"total": 1.0}}

    async def index_info(self) -> dict:
        if self.fail is not None:
            raise self.fail
        return {"version": "v1", "index": "/idx", "num_passages": 3, "loaded_at": 0.0}


def client(service=None, token=None) -> TestClient:
    return TestClient(build_http_api(service or EchoService(), LIMITS, token))


@pytest.mark.parametrize("body, field", [
    ({}, "question"),
    ({"question": ""}, "question"),
    ({"question": "x" * 51}, "question"),
    ({"question": "q", "top_k": 0}, "top_k"),
    ({"question": "q", "top_k": 6}, "top_k"),
    ({"question": "q", "top_k": "three"}, "top_k"),
    ({"question": "q", "decoding": "beam"}, "decoding"),
    ({"question": "q", "max_new_tokens": 9}, "max_new_tokens"),
    ([1, 2], "body"),
])
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
    calls = {"/v1/index": lambda **kw: c.get("/v1/index", **kw),
             "/v1/answer": lambda **kw: c.post("/v1/answer", json={"question": "q"}, **kw)}
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
    r = client(EchoService(fail=RuntimeError("boom /etc/raggen\nsecond line"))).post("/v1/answer", json={"question": "q"})
    assert r.status_code == 500 and r.json()["error"] == "server: internal error"
    assert r.json()["request_id"] and "RuntimeError" not in r.text and "boom" not in r.text


# ---------------------------------------------------------------------------------- index holder


class Store:
    """Versions by name; a name in ``corrupt`` fails to load like a tampered upload does."""

    def __init__(self):
        self.latest = "v1"
        self.corrupt: set[str] = set()
        self.loads: list[str] = []

    def load(self, root: str, version: str | None) -> LiveIndex:
        version = version or self.latest
        self.loads.append(version)
        if version in self.corrupt:
            raise IndexIntegrityError(f"{root}/{version}/shard-00000.faiss: sha256 mismatch")
        return LiveIndex(root=root, version=version, index=object(), num_passages=10, loaded_at=0.0)


def test_holder_swaps_refuses_and_follows_latest():
    store = Store()
    holder = IndexHolder(store.load, lambda root: store.latest, retry_backoff_s=0.0)
    with pytest.raises(NoIndexError):
        holder.live
    store.corrupt.add("v0")
    store.latest = "v0"
    with pytest.raises(IndexIntegrityError):  # nothing to fall back to: the replica must fail
        holder.configure("/idx", "v0")
    store.latest = "v1"
    # a replica started while the user_config pins a refused version serves LATEST instead
    assert not IndexHolder(store.load, lambda root: store.latest).configure("/idx", "v0")
    late = IndexHolder(store.load, lambda root: store.latest)
    late.configure("/idx", "v0")
    assert late.live.version == "v1" and "refused /idx version v0" in late.last_error
    assert "serving v1 instead" in late.last_error and late.info()["serving_fallback"]
    assert holder.configure("/idx") and holder.live.version == "v1"
    assert holder.swap_to("/idx", "v2") and holder.live.version == "v2"
    store.corrupt.add("v3")
    assert not holder.swap_to("/idx", "v3")
    assert holder.live.version == "v2" and "sha256 mismatch" in holder.info()["last_error"]
    store.latest = "v3"
    assert not holder.poll_latest("/idx")
    assert not holder.poll_latest("/idx")  # a refused version is not reloaded on every tick
    assert store.loads.count("v3") == 1  # an integrity error is refused for good at once
    info = holder.info()
    assert (info["version"], info["latest"], info["serving_fallback"]) == ("v2", "v3", True)
    store.latest = "v4"
    assert holder.poll_latest("/idx") and holder.live.version == "v4" and holder.info()["last_error"] is None
    assert not holder.info()["serving_fallback"]
    holder.refuse("invalid user_config")
    assert holder.live.version == "v4" and holder.info()["last_error"] == "invalid user_config"


class Flaky(Store):
    """A store whose loads of the names in ``down`` time out (a transient error, not a bad upload),
    with versions listed newest first (what ``versions_newest_first`` reads from manifests)."""

    def __init__(self, versions: list[str]):
        super().__init__()
        self.versions = versions
        self.down: set[str] = set()

    def load(self, root: str, version: str | None) -> LiveIndex:
        if (version or self.latest) in self.down:
            self.loads.append(version or self.latest)
            raise TimeoutError("connect timeout on endpoint URL")
        return super().load(root, version)

    def newest_first(self, root: str) -> list[str]:
        return list(reversed(self.versions))


def _holder(store: Flaky) -> IndexHolder:
    return IndexHolder(store.load, lambda root: store.latest, store.newest_first, retry_attempts=3,
                       retry_backoff_s=0.0, max_backoff_s=0.0)


def test_transient_errors_are_retried_and_never_refused():
    store = Flaky(["v1", "v2"])
    store.latest = "v2"
    store.down.add("v2")
    holder = _holder(store)
    # v2 times out 3 times at start: serve the newest older version, but do not refuse v2
    assert not holder.configure("/idx") and holder.live.version == "v1"
    assert store.loads.count("v2") == 3 and ("/idx", "v2") not in holder._refused
    assert "will retry" in holder.last_error and holder.info()["serving_fallback"]
    assert not holder.poll_latest("/idx")  # still down: retried on the next tick (backoff 0 here)
    store.down.clear()
    assert holder.poll_latest("/idx") and holder.live.version == "v2"  # the store is back: converged
    assert not holder.info()["serving_fallback"] and holder.last_error is None


def test_watcher_backs_off_after_a_transient_failure():
    store = Flaky(["v1", "v2"])
    holder = IndexHolder(store.load, lambda root: store.latest, store.newest_first, retry_backoff_s=60.0)
    assert holder.configure("/idx") and holder.live.version == "v1"
    store.latest, store.down = "v2", {"v2"}
    assert not holder.poll_latest("/idx") and store.loads.count("v2") == 1
    store.down.clear()
    assert not holder.poll_latest("/idx") and store.loads.count("v2") == 1  # waiting out the backoff
    holder._transient[("/idx", "v2")] = (1, 0.0)  # the backoff elapsed
    assert holder.poll_latest("/idx") and holder.live.version == "v2"


def test_replicas_that_cannot_verify_latest_converge_on_the_newest_good_version():
    store = Flaky(["v1", "v2", "v3", "v4"])  # v4 is newer than LATEST: never a fallback
    store.latest = "v2"
    first = _holder(store)
    assert first.configure("/idx", watch_latest=False) and first.live.version == "v2"
    store.corrupt.add("v3")
    store.latest = "v3"
    assert not first.poll_latest("/idx") and first.live.version == "v2"
    second = _holder(store)  # started later (the autoscaler): LATEST does not verify
    assert not second.configure("/idx") and second.live.version == "v2"
    for holder in (first, second):
        info = holder.info()
        assert (info["version"], info["latest"], info["serving_fallback"]) == ("v2", "v3", True)
        assert "v3" in info["last_error"] and "sha256" in info["last_error"]
    # a replica that was still on v1 when LATEST moved v1 -> v2 -> v3 (bad) moves up to v2 as well
    laggard = _holder(store)
    store.latest = "v1"
    assert laggard.configure("/idx") and laggard.live.version == "v1"
    store.latest = "v3"
    assert not laggard.poll_latest("/idx") and laggard.live.version == "v2"
    assert "v4" not in store.loads
    # nothing verifiable at all: the replica fails instead of serving nothing
    store.corrupt.update({"v1", "v2"})
    with pytest.raises(IndexIntegrityError):
        _holder(store).configure("/idx")


def test_holder_watcher_thread_cancel_and_unreadable_latest():
    store = Store()
    reachable = {"ok": True}

    def latest(root: str) -> str:
        if not reachable["ok"]:
            raise OSError("store unreachable")
        return store.latest

    holder = IndexHolder(store.load, latest)
    assert holder.configure("/idx", watch_latest=True, watch_interval_s=0.02)
    store.latest = "v2"
    deadline = time.monotonic() + 5
    while holder.live.version != "v2" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert holder.live.version == "v2"  # the watcher thread followed LATEST by itself
    holder.stop_watching()
    retired = threading.Event()
    retired.set()
    store.latest = "v3"
    assert not holder.poll_latest("/idx", retired) and holder.live.version == "v2"
    assert holder.poll_latest("/idx") and holder.live.version == "v3"  # a cancelled tick is not a refusal
    reachable["ok"] = False
    assert not holder.configure("/idx") and holder.live.version == "v3"
    assert "store unreachable" in holder.last_error
    with pytest.raises(ConfigError, match="store unreachable"):
        IndexHolder(store.load, latest).configure("/idx")  # nothing live to fall back to


def test_index_user_config_rules():
    assert IndexUserConfig(index="/i").model_dump() == {
        "index": "/i", "version": None, "watch_latest": False, "watch_interval_s": 10.0}
    with pytest.raises(ValidationError, match="only one"):
        IndexUserConfig(index="/i", version="v1", watch_latest=True)
    with pytest.raises(ValidationError):
        IndexUserConfig(index="/i", bogus=1)


# ---------------------------------------------------------------------------------- app builders


def test_app_args_and_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from raggen.serve.app import parse_app_args, serve_deploy_config, with_index

    with pytest.raises(ConfigError, match=r"args\.generator"):
        parse_app_args({"index": "/idx"})
    with pytest.raises(ConfigError, match=r"args\.autoscaling"):
        parse_app_args({"index": "/i", "generator": "/g", "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    config = serve_deploy_config({"index": "/idx", "generator": "/g"}, port=8123)
    ServeDeploySchema.model_validate(config)
    swapped = with_index(config, "/idx", "v2")
    ServeDeploySchema.model_validate(swapped)
    before, after = config["applications"][0], swapped["applications"][0]
    assert before["args"] == after["args"]  # args unchanged: Serve reconfigures instead of restarting
    assert after["deployments"][0]["user_config"]["version"] == "v2"
    assert before["deployments"][0]["user_config"]["version"] is None


def test_shipped_serve_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from raggen.serve.app import IMPORT_PATH, parse_app_args

    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    for app in schema.applications:
        assert app.import_path == IMPORT_PATH
        parse_app_args(app.args)


@pytest.mark.parametrize("config_file", [None, "quickstart.yaml"])
def test_raggen_config_becomes_valid_app_args(config_file):
    from raggen.config import load_config
    from raggen.app.serving import app_args_from_config
    from raggen.serve.app import parse_app_args

    cfg = load_config(REPO / "configs" / config_file if config_file else None,
                      ["serve.s3.endpoint_url=http://127.0.0.1:9000", "serve.s3.region=eu-west-1"])
    args = parse_app_args(app_args_from_config(cfg))
    assert args.index == cfg.serve.index and args.max_top_k == cfg.serve.max_top_k
    assert args.s3 == {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1", "max_attempts": 5}
    assert args.max_target_length > args.max_new_tokens  # room for the answer and its EOS


# ---------------------------------------------------------------------------------- stage functions


def _hits(texts: list[str], scores: list[float]) -> list[dict]:
    return [{"id": f"p{i}", "title": f"T{i}", "text": t, "score": s} for i, (t, s) in enumerate(zip(texts, scores))]


def test_rerank_batch_keeps_the_cross_encoders_top_k(tmp_path):
    from raggen.models import Reranker, make_tiny_reranker, passage_text
    from raggen.serve.deployments import rerank_batch

    reranker = Reranker.from_pretrained(make_tiny_reranker(str(tmp_path / "rr"))).eval()
    questions = ["where is the mill?", "who owns the ferry?"]
    candidates = [_hits(["the mill is in Ost", "a ferry crosses", "bread and salt"], [3.0, 2.0, 1.0]),
                  _hits(["the ferry belongs to Ada", "a quiet river"], [5.0, 4.0])]
    out = rerank_batch(reranker, questions, candidates, [2, 1])
    for q, cands, k, got in zip(questions, candidates, [2, 1], out):  # brute force: one question at a time
        scores = reranker.score([q], [[passage_text(h["title"], h["text"]) for h in cands]])[0]
        order = sorted(range(len(cands)), key=lambda j: -float(scores[j]))[:k]
        assert [h["id"] for h in got] == [cands[j]["id"] for j in order]
        np.testing.assert_allclose([h["score"] for h in got], [float(scores[j]) for j in order], atol=1e-4)
        assert all(h["text"] == cands[int(h["id"][1:])]["text"] for h in got)


def test_generate_batch_groups_mixed_requests(tmp_path):
    from raggen.models import Generator, make_tiny_generator
    from raggen.serve.deployments import decode_answers, generate_batch

    generator = Generator.from_pretrained(make_tiny_generator(str(tmp_path / "gen")), max_target_length=6).eval()
    questions = ["q one", "q two", "q three", "q four"]
    hits = [_hits(["a b", "c d"], [1.0, 0.5]), _hits(["e f"], [2.0]), [], _hits(["g h", "i j"], [0.1, 0.2])]
    decodings = ["rag-token", "rag-sequence-thorough", "rag-token", "rag-token"]
    answers = generate_batch(generator, questions, hits, decodings, [3, 3, 3, 3], num_beams=2)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers) and answers[2] == ""
    with torch.no_grad():  # rows 0 and 3 share (rag-token, k=2, 3 tokens): one group, same as decoding them alone
        together = decode_answers(generator, ["q one", "q four"], [hits[0], hits[3]], "rag-token", 3, 2)
    assert [answers[0], answers[3]] == together
    with pytest.raises(ValueError, match="decoding"):
        decode_answers(generator, ["q"], [hits[1]], "greedy", 3, 2)
