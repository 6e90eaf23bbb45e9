"""The serve graph on a real Ray Serve, over real HTTP: evidence, validation, auth, index hot-swap.

Two small MiniLM indexes are published from the generated world's passages v1 and v2 (encoded in
the test process: ``tests.helpers.publish_encoded_index``; the Ray Data build has its own tests); the reader is the shipped one (``raggen/assets/reader``, pre-trained to read answers out of
passages). The tests assert on the evidence (passage ids/scores against exact search, the passage
texts of v1 vs v2, index versions) and, across the hot-swap, on the answers themselves.

The tests share one deployed app (module scope) and each first puts it in the state it needs.
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
import numpy as np
import pandas as pd
import pytest
from ray import serve

from raggen.corpus import read_passages  # noqa: E402
from raggen.corpus.world import WorldConfig, read_changed_facts, write_world  # noqa: E402
from raggen.index import embeddings_of, load_version, set_latest  # noqa: E402
from raggen.models import TextEncoder  # noqa: E402
from raggen.serve.app import deploy_config, serve_deploy_config, wait_until_running, with_index  # noqa: E402
from raggen.serve.client import ServiceError, ask  # noqa: E402
from raggen.testing import copy_version, wait_for
from raggen.train.qa_scores import exact_match  # noqa: E402
from tests.helpers import publish_encoded_index

_wait_for = functools.partial(wait_for, poll_s=0.25, retry_on=(httpx.HTTPError,))

pytestmark = pytest.mark.integration

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
QUERY_MAX_LENGTH = 64
TOP_K = 5
TOKEN = "s3cret-token"
MAX_NEW_TOKENS = 12
SHIPPED_READER = str(Path(__file__).resolve().parents[2] / "raggen" / "assets" / "reader")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("serve")
    files = write_world(out / "world", WorldConfig(num_entities=30, seed=0, changed_fraction=0.5))
    root = str(out / "index")
    encoder = TextEncoder.from_pretrained(MINILM, pooling="mean", max_length=128)
    for version, passages in (("v1", files.passages_v1), ("v2", files.passages_v2)):
        # in this process: the Ray Data build has its own tests; these test what serves the index
        publish_encoded_index(read_passages(passages), root, encoder, MINILM, out, version=version)
    texts = {
        v: pd.read_csv(p, sep="\t", dtype=str).set_index("id")["text"].to_dict()
        for v, p in (("v1", files.passages_v1), ("v2", files.passages_v2))
    }
    return SimpleNamespace(
        out=out, root=root, texts=texts, changed=read_changed_facts(files.changed), generator=SHIPPED_READER
    )


@pytest.fixture(scope="module")
def exact(world):
    """Exact top-k by brute-force inner product over each version's stored passage embeddings."""
    encoder = TextEncoder.from_pretrained(MINILM, pooling="mean", max_length=QUERY_MAX_LENGTH)
    tables = {}
    for version in ("v1", "v2"):
        loaded = load_version(world.root, version)
        xb = np.concatenate([embeddings_of(s.passages) for s in loaded.shards])  # (n, d)
        ids = [pid for s in loaded.shards for pid in s.passages.column("id").to_pylist()]
        tables[version] = (xb, ids)

    def search(question: str, version: str, k: int = TOP_K) -> tuple[list[str], np.ndarray]:
        xq = encoder.encode([question]).numpy()[0]  # (d,)
        xb, ids = tables[version]
        scores = xb @ xq  # (n,)
        order = np.argsort(-scores)[:k]
        return [ids[i] for i in order], scores[order]

    return search


@pytest.fixture(scope="module")
def service(world, moto_s3):
    port = _free_port()
    args = {
        "index": world.root,
        "index_version": "v1",
        "query_encoder": {"name_or_path": MINILM, "pooling": "mean", "max_length": QUERY_MAX_LENGTH},
        "generator": world.generator,
        "max_source_length": 192,
        "max_target_length": 16,
        "num_beams": 2,
        "default_top_k": TOP_K,
        "max_top_k": 8,
        "max_question_chars": 200,
        "max_new_tokens": MAX_NEW_TOKENS,
        "replica_num_cpus": 0.1,
        "ingress_num_cpus": 0.05,
        "max_batch_size": 4,
        "batch_wait_timeout_s": 0.005,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2},
        # how the Retriever reaches S3 when a user_config names an s3:// index; the credentials are
        # never Serve args: they come from the replicas' environment
        "s3": {k: v for k, v in moto_s3.items() if not k.startswith("aws_")},
    }
    credentials = {
        "AWS_ACCESS_KEY_ID": moto_s3["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": moto_s3["aws_secret_access_key"],
    }
    config = serve_deploy_config(args, host="127.0.0.1", port=port, runtime_env={"env_vars": credentials})
    deploy_config(config)
    wait_until_running(timeout_s=300)
    url = f"http://127.0.0.1:{port}"
    _wait_for(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, 60, "/healthz")
    return SimpleNamespace(url=url, config=config, http=httpx.Client(base_url=url, timeout=60))


def _use(service, config: dict, root: str, version: str, timeout_s: float = 90) -> None:
    """Deploy ``config`` and wait until the live index is ``root``@``version``."""
    deploy_config(config)

    def live() -> bool:
        info = service.http.get("/v1/index").json()
        return (info.get("index"), info.get("version")) == (root, version)

    _wait_for(live, timeout_s, f"index {root} version {version}")


def _probe(world, exact, service=None) -> SimpleNamespace:
    """A changed fact whose gold passage exact search ranks in the top k under both versions and,
    given ``service`` (serving v1), that the reader answers with its v1 value."""
    for fact in world.changed:
        gold = fact.gold_passage_ids[0]
        if all(gold in exact(fact.question, v)[0] for v in ("v1", "v2")):
            assert world.texts["v1"][gold] != world.texts["v2"][gold]
            if service is not None and not exact_match(
                _answer(service, fact.question).json()["answer"], fact.answers_v1
            ):
                continue
            return SimpleNamespace(question=fact.question, gold=gold, v1=fact.answers_v1, v2=fact.answers_v2)
    pytest.fail("no changed fact is both retrievable in both versions and read right from v1 by the reader")


def _answer(service, question: str, **extra) -> httpx.Response:
    return service.http.post(
        "/v1/answer",
        json={"question": question, "top_k": TOP_K, "decoding": "rag-token", "max_new_tokens": MAX_NEW_TOKENS, **extra},
    )


def test_answers_with_evidence_from_exact_search(service, world, exact):
    _use(service, with_index(service.config, world.root, "v1"), world.root, "v1")
    for fact in world.changed[:3]:
        r = _answer(service, fact.question)
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["answer"], str) and body["index_version"] == "v1"
        assert {"retrieve", "generate", "total"} <= set(body["timings_ms"])
        ids, scores = exact(fact.question, "v1")
        assert [p["id"] for p in body["passages"]] == ids
        np.testing.assert_allclose([p["score"] for p in body["passages"]], scores, rtol=1e-4, atol=1e-4)
        for p in body["passages"]:
            assert p["text"] == world.texts["v1"][p["id"]] and p["title"]
    for decoding in ("rag-sequence-fast", "rag-sequence-thorough"):
        r = _answer(service, world.changed[0].question, decoding=decoding, top_k=2)
        assert r.status_code == 200 and len(r.json()["passages"]) == 2, r.text
    info = service.http.get("/v1/index").json()
    assert info["version"] == "v1" and info["num_passages"] == len(world.texts["v1"]) and info["last_error"] is None
    assert ask(service.url, world.changed[0].question, top_k=1)["index_version"] == "v1"


@pytest.mark.parametrize(
    "content, content_type, field, status",
    [
        (json.dumps({"top_k": 3}), "application/json", "question", 422),
        (json.dumps({"question": ""}), "application/json", "question", 422),
        (json.dumps({"question": "x" * 201}), "application/json", "question", 422),
        (json.dumps({"question": "q", "top_k": 0}), "application/json", "top_k", 422),
        (json.dumps({"question": "q", "top_k": 9}), "application/json", "top_k", 422),
        (json.dumps({"question": "q", "top_k": "5"}), "application/json", "top_k", 422),
        (json.dumps({"question": "q", "decoding": "greedy"}), "application/json", "decoding", 422),
        (
            json.dumps({"question": "q", "max_new_tokens": MAX_NEW_TOKENS + 1}),
            "application/json",
            "max_new_tokens",
            422,
        ),
        ('{"question": "q",', "application/json", "body", 422),
        (json.dumps({"question": "q"}), "text/plain", "content-type", 415),
    ],
)
def test_invalid_requests_get_4xx_naming_the_field(service, content, content_type, field, status):
    r = service.http.post("/v1/answer", content=content, headers={"content-type": content_type})
    assert r.status_code == status, r.text
    assert field in r.json()["error"].split(":")[0], r.json()
    assert _answer(service, "Who founded the mill?").status_code == 200  # the service still answers


def test_hot_swap_v1_to_v2_under_load_fails_no_request(service, world, exact):
    """A steady stream of one changed fact's question while the index swaps v1 -> v2: every request
    is answered, the versions switch once, the evidence is each version's own passage, and the
    answer switches from the v1 value to the v2 value of the fact (no retraining)."""
    _use(service, with_index(service.config, world.root, "v1"), world.root, "v1")
    probe = _probe(world, exact, service)
    seen: list[
        tuple[int, str | None, str | None, str | None]
    ] = []  # (status, index version, gold passage text, answer)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            deadline = time.monotonic() + 120
            while not stop.is_set() and len(seen) < 400 and time.monotonic() < deadline:
                try:
                    r = http.post(
                        "/v1/answer",
                        json={"question": probe.question, "top_k": TOP_K, "max_new_tokens": MAX_NEW_TOKENS},
                    )
                except httpx.HTTPError as exc:
                    seen.append((0, None, repr(exc), None))
                    continue
                body = r.json() if r.status_code == 200 else {}
                gold = next((p["text"] for p in body.get("passages", []) if p["id"] == probe.gold), None)
                seen.append((r.status_code, body.get("index_version"), gold, body.get("answer")))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    _wait_for(lambda: len(seen) >= 5, 90, "the first answers")
    deploy_config(with_index(service.config, world.root, "v2"))
    _wait_for(lambda: any(x[1] == "v2" for x in seen), 90, "answers from v2")
    n = len(seen)
    _wait_for(lambda: len(seen) >= n + 5, 90, "more answers after the swap")
    stop.set()
    thread.join(timeout=60)

    assert [x[0] for x in seen] == [200] * len(seen), [x for x in seen if x[0] != 200][:3]
    versions = [x[1] for x in seen]
    first_v2 = versions.index("v2")
    assert first_v2 > 0 and versions == ["v1"] * first_v2 + ["v2"] * (len(versions) - first_v2)
    for _, version, gold_text, _ in seen:  # the evidence is the version's own passage text
        assert gold_text == world.texts[version][probe.gold]
    answers = {version: {a for _, v, _, a in seen if v == version} for version in ("v1", "v2")}
    assert all(exact_match(a, probe.v1) for a in answers["v1"]), (probe.v1, answers["v1"])
    assert all(exact_match(a, probe.v2) for a in answers["v2"]), (probe.v2, answers["v2"])


def test_hot_swap_to_an_index_on_s3(service, world, exact, s3_bucket):
    from raggen.storage import upload_dir, write_bytes

    bucket, options = s3_bucket
    uri = f"s3://{bucket}/index"
    upload_dir(Path(world.root, "v2"), f"{uri}/v2", options)
    write_bytes(f"{uri}/LATEST", b"v2\n", options)
    _use(service, with_index(service.config, world.root, "v1"), world.root, "v1")
    _use(service, with_index(service.config, uri, None), uri, "v2")  # None: the version LATEST names
    probe = _probe(world, exact)
    body = _answer(service, probe.question).json()
    assert body["index_version"] == "v2"
    assert next(p["text"] for p in body["passages"] if p["id"] == probe.gold) == world.texts["v2"][probe.gold]


def test_corrupt_version_is_refused_and_the_old_keeps_serving(service, world, exact):
    _use(service, with_index(service.config, world.root, "v2"), world.root, "v2")
    probe = _probe(world, exact)
    copy_version(world.root, "v2", "v3", tamper=True)

    # 1. pinned through user_config: refused, visible, v2 keeps answering
    deploy_config(with_index(service.config, world.root, "v3"))
    info = _wait_for(lambda: (i := service.http.get("/v1/index").json()).get("last_error") and i, 60, "the refusal")
    assert info["version"] == "v2" and "v3" in info["last_error"] and "sha256" in info["last_error"]
    assert serve.status().applications["raggen"].status == "RUNNING"
    r = _answer(service, probe.question)
    assert r.status_code == 200 and r.json()["index_version"] == "v2"

    # 2. followed through LATEST by the watcher: v3 refused, then a good v4 is picked up by itself.
    # Step 1 never read LATEST, so ``latest == "v3"`` can only come from the LATEST follower having
    # read the pointer (and then refused what it names): wait for that, not for a fixed time.
    set_latest(world.root, "v3", verify=False)
    deploy_config(with_index(service.config, world.root, None, watch_latest=True, watch_interval_s=0.5))
    info = _wait_for(
        lambda: (i := service.http.get("/v1/index").json()).get("latest") == "v3" and i,
        60,
        "the watcher to read LATEST -> v3 and refuse it",
    )
    assert info["version"] == "v2" and info["serving_fallback"] and "v3" in (info["last_error"] or "")
    copy_version(world.root, "v1", "v4", tamper=False)
    set_latest(world.root, "v4")
    _wait_for(lambda: service.http.get("/v1/index").json()["version"] == "v4", 60, "the watcher to load v4")
    body = _answer(service, probe.question).json()
    assert body["index_version"] == "v4"
    assert next(p["text"] for p in body["passages"] if p["id"] == probe.gold) == world.texts["v1"][probe.gold]


def test_bearer_token_guards_every_route_but_healthz(service, world):
    config = with_index(service.config, world.root, "v2")
    config["applications"][0]["deployments"].append(
        {
            "name": "Ingress",
            "ray_actor_options": {"num_cpus": 0.05, "runtime_env": {"env_vars": {"RAGGEN_API_TOKEN": TOKEN}}},
        }
    )
    deploy_config(config)
    _wait_for(lambda: service.http.get("/v1/index").status_code == 401, 120, "the token to be enforced")
    assert service.http.get("/healthz").status_code == 200
    r = _answer(service, "Who founded the mill?")
    assert r.status_code == 401 and r.json()["error"].startswith("authorization")
    r = service.http.post("/v1/answer", json={"question": "q"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = service.http.get("/v1/index", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["version"] == "v2"
    assert ask(service.url, "Who founded the mill?", token=TOKEN)["index_version"] == "v2"
    with pytest.raises(ServiceError, match="401"):
        ask(service.url, "Who founded the mill?", token="wrong")


def _replicas(name: str) -> int:
    """Running replicas of deployment ``name`` in the raggen app."""
    from raggen.serve.app import APP_NAME

    app = serve.status().applications[APP_NAME]
    return int(app.deployments[name].replica_states.get("RUNNING", 0))


def test_autoscaling_adds_replicas_under_load_and_removes_them_after(service, world):
    """min 1 / max 2 replicas, target 1 ongoing request: 6 concurrent clients push the deployment
    where requests wait (the Generator: the reader's decoding dominates a request, retrieval takes
    milliseconds) to 2 replicas with no failed request; when the load stops every model deployment
    is back to 1."""
    fast = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 2,
        "look_back_period_s": 2,
    }
    config = with_index(service.config, world.root, "v1")
    app = config["applications"][0]
    app["args"] = {**app["args"], "autoscaling": fast}
    _use(service, config, world.root, "v1")
    wait_until_running(timeout_s=120)
    statuses: list[int] = []
    peak = {name: 1 for name in ("Retriever", "Generator")}
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post(
                        "/v1/answer", json={"question": "Who founded the mill?", "top_k": TOP_K, "max_new_tokens": 4}
                    )
                    statuses.append(r.status_code)
                except httpx.HTTPError:
                    statuses.append(0)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()

    def scaled_up() -> bool:
        for name in peak:
            peak[name] = max(peak[name], _replicas(name))
        return peak["Generator"] == 2

    try:
        _wait_for(scaled_up, 120, "2 Generator replicas under load")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; peak RUNNING replicas {peak}; {len(statuses)} answers, states now {serve.status().applications}"
        ) from None
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert statuses and set(statuses) == {200}, f"{statuses.count(200)}/{len(statuses)} succeeded"
    _wait_for(lambda: all(_replicas(name) == 1 for name in peak), 120, "back to 1 replica once idle")
    assert service.http.get("/healthz").status_code == 200
    # the module's last test: its teardown shuts Serve down (no redeploy of the fixture's config here)
