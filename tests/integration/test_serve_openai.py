"""The service as its users and operators see it, on a real Ray Serve over real HTTP: the
OpenAI-compatible chat route through the ``openai`` client, the Prometheus metrics on Ray's metrics
port, the access log, and per-deployment resources read back from Serve.

One app is deployed for the whole module (a MiniLM index of the generated world, the shipped
reader) with a bearer token, per-deployment resources and Ray's metrics export on a free port,
so the OpenAI, metrics and resources checks together stay well under two minutes on two cores.
Tests run in file order; the metrics test relies on the requests the earlier tests made.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import ray
from ray import serve

from raggen.corpus import read_passages
from raggen.corpus.world import WorldConfig, read_changed_facts, write_world  # noqa: E402
from raggen.models import TextEncoder
from raggen.serve.app import (  # noqa: E402
    APP_NAME,
    deploy_config,
    serve_deploy_config,
    wait_until_running,
    with_index,
)
from raggen.testing import copy_version, wait_for
from tests.helpers import publish_encoded_index

_wait_for = functools.partial(wait_for, poll_s=0.5, retry_on=(httpx.HTTPError, ValueError))

pytestmark = pytest.mark.integration

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SHIPPED_READER = str(Path(__file__).resolve().parents[2] / "raggen" / "assets" / "reader")
TOKEN = "openai-test-token"
MAX_NEW_TOKENS = 12
TOP_K = 3
GIB = 1024**3
# per-deployment resources: each differs from the shared defaults (0.1 CPU, no GPU, autoscaling 1..1)
DEPLOYMENTS = {
    "retriever": {"num_cpus": 0.15, "memory_gb": 0.25},
    "generator": {"num_cpus": 0.2, "autoscaling": {"max_replicas": 2, "target_ongoing_requests": 3}},
    "ingress": {"num_cpus": 0.05},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    if ray.is_initialized():
        ray.shutdown()
    metrics_port = _free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        out = tmp_path_factory.mktemp("serve-openai")
        files = write_world(out / "world", WorldConfig(num_entities=30, seed=0, changed_fraction=0.5))
        root = str(out / "index")
        # in this process: the Ray Data build has its own tests; this one tests what serves the index
        encoder = TextEncoder.from_pretrained(MINILM, pooling="mean", max_length=128)
        publish_encoded_index(read_passages(files.passages_v1), root, encoder, MINILM, out, num_shards=1)
        copy_version(root, "v1", "v2", tamper=False)
        copy_version(root, "v1", "v3", tamper=True)
        port = _free_port()
        args = {
            "index": root,
            "index_version": "v1",
            "query_encoder": {"name_or_path": MINILM, "pooling": "mean", "max_length": 64},
            "generator": SHIPPED_READER,
            "max_source_length": 192,
            "max_target_length": MAX_NEW_TOKENS + 1,
            "num_beams": 2,
            "default_top_k": TOP_K,
            "max_top_k": 5,
            "max_question_chars": 200,
            "max_new_tokens": MAX_NEW_TOKENS,
            "replica_num_cpus": 0.1,
            "max_batch_size": 4,
            "batch_wait_timeout_s": 0.005,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2},
            "deployments": DEPLOYMENTS,
        }
        config = serve_deploy_config(
            args, host="127.0.0.1", port=port, runtime_env={"env_vars": {"RAGGEN_API_TOKEN": TOKEN}}
        )
        deploy_config(config)
        wait_until_running(timeout_s=300)
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, 60, "/healthz")
        http = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"})
        yield SimpleNamespace(
            url=url,
            http=http,
            config=config,
            root=root,
            metrics_port=metrics_port,
            facts=read_changed_facts(files.changed),
            openai=openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60),
        )
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(service, question: str, **kwargs):
    kwargs = {"model": "raggen-test", "max_tokens": MAX_NEW_TOKENS, **kwargs}
    return service.openai.chat.completions.create(
        messages=[{"role": "system", "content": "Answer from the passages."}, {"role": "user", "content": question}],
        **kwargs,
    )


def _streamed(service, question: str, **kwargs) -> tuple[str, list]:
    chunks = list(_chat(service, question, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# ---------------------------------------------------------------------------------- OpenAI API


def test_openai_client_completion_and_stream_agree(service):
    question = service.facts[0].question
    greedy = {"extra_body": {"raggen": {"num_beams": 1}}}
    completion = _chat(service, question, model="any-model-name", **greedy)
    text = completion.choices[0].message.content
    assert completion.model == "any-model-name" and completion.object == "chat.completion"
    assert isinstance(text, str) and text and completion.choices[0].finish_reason in ("stop", "length")
    evidence = completion.model_extra["raggen"]
    assert evidence["index_version"] == "v1" and len(evidence["passages"]) == TOP_K
    assert set(evidence["passages"][0]) == {"id", "title", "text", "score"}

    # the same question through /v1/answer: the same evidence and the same greedy answer
    r = service.http.post(
        "/v1/answer", json={"question": question, "top_k": TOP_K, "num_beams": 1, "max_new_tokens": MAX_NEW_TOKENS}
    )
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == text and r.json()["passages"] == evidence["passages"]

    streamed, chunks = _streamed(service, question, **greedy)
    assert streamed == text, [c.choices[0].delta.content for c in chunks if c.choices]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 or len(text.split()) == 1  # token by token, not one lump
    first, last = chunks[0], chunks[-1]
    assert (
        first.choices[0].delta.role == "assistant" and first.model_extra["raggen"]["passages"] == evidence["passages"]
    )
    assert last.choices[0].finish_reason == completion.choices[0].finish_reason
    assert (
        last.model_extra["raggen"]["index_version"] == "v1" and "generate" in last.model_extra["raggen"]["timings_ms"]
    )
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.model == "raggen-test" for c in chunks)

    # RAG-Token beam search (the service's num_beams=2) streams the answer it settles on
    beam = _chat(service, question).choices[0].message.content
    assert _streamed(service, question)[0] == beam


def test_openai_route_auth_and_validation(service):
    question = service.facts[0].question
    wrong = openai.OpenAI(base_url=f"{service.url}/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="m", messages=[{"role": "user", "content": question}])
    r = httpx.post(f"{service.url}/v1/chat/completions", json={"model": "m", "messages": []}, timeout=30)
    assert r.status_code == 401 and r.json()["error"].startswith("authorization")
    with pytest.raises(openai.UnprocessableEntityError) as info:
        _chat(service, question, max_tokens=MAX_NEW_TOKENS + 1)
    assert info.value.response.json()["error"].startswith("max_tokens:")
    for body, field in [
        ({"model": "m", "messages": [{"role": "system", "content": "no question"}]}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "q"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "q"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "q"}], "raggen": {"top_k": 6}}, "raggen.top_k"),
    ]:
        r = service.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 422 and r.json()["error"].startswith(f"{field}:"), (body, r.text)


# ---------------------------------------------------------------------------------- watching it


def _samples(port: int) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [
        s for family in text_string_to_metric_families(text) for s in family.samples if s.name.startswith("ray_raggen_")
    ]


def _value(samples: list, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_access_log_line_and_request_id(service):
    r = service.http.post(
        "/v1/answer", json={"question": service.facts[1].question}, headers={"X-Request-Id": "rid-from-the-client-42"}
    )
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["rid-from-the-client-42"]
    r = service.http.get("/v1/index")
    (rid,) = r.headers.get_list("x-request-id")  # Serve's own id, returned once
    logs = ray._private.worker._global_node.get_logs_dir_path()  # the replicas' stderr files

    def logged() -> dict | None:
        for path in glob.glob(os.path.join(logs, "worker-*.err")):
            for line in Path(path).read_text(errors="replace").splitlines():
                if f'"request_id":"{rid}"' in line:
                    return json.loads(line[line.index("{") :])
        return None

    entry = _wait_for(logged, 30, f"the access-log line of request {rid}")
    assert entry["type"] == "access" and entry["route"] == "/v1/index" and entry["status"] == 200
    assert entry["method"] == "GET" and entry["latency_ms"] > 0


def test_prometheus_metrics_on_rays_metrics_port(service):
    # a swap v1 -> v2 and a refused (tampered) v3, for the index metrics
    deploy_config(with_index(service.config, service.root, "v2"))
    _wait_for(lambda: service.http.get("/v1/index").json()["version"] == "v2", 90, "index v2")
    deploy_config(with_index(service.config, service.root, "v3"))
    _wait_for(lambda: "v3" in (service.http.get("/v1/index").json().get("last_error") or ""), 90, "v3 refused")

    def exported() -> list | None:
        samples = _samples(service.metrics_port)
        wanted = [
            _value(samples, "ray_raggen_http_requests_total", route="/v1/chat/completions", status="200"),
            _value(samples, "ray_raggen_http_requests_total", route="/v1/chat/completions", status="401"),
            _value(samples, "ray_raggen_http_requests_total", route="/v1/chat/completions", status="422"),
            _value(samples, "ray_raggen_http_requests_total", route="/v1/index", method="GET", status="200"),
            _value(samples, "ray_raggen_http_request_latency_ms_count", route="/v1/answer"),
            _value(samples, "ray_raggen_index_swaps_total"),
            _value(samples, "ray_raggen_index_swaps_refused_total"),
            _value(samples, "ray_raggen_index_version_info", version="v2"),
            *(_value(samples, "ray_raggen_stage_latency_ms_count", stage=s) for s in ("retrieve", "generate")),
            *(_value(samples, "ray_raggen_batch_size_count", stage=s) for s in ("retrieve", "generate")),
        ]
        return samples if all(v > 0 for v in wanted) else None

    samples = _wait_for(exported, 60, "raggen metrics on Ray's metrics port", poll_s=1.0)
    assert _value(samples, "ray_raggen_index_version_info", version="v2") == 1
    assert _value(samples, "ray_raggen_index_version_info", version="v1") == 0  # the replaced version
    assert _value(samples, "ray_raggen_index_swaps_refused_total") >= 1
    assert _value(samples, "ray_raggen_batch_size_bucket", stage="generate", le="+Inf") >= 1
    (version_sample,) = [
        s for s in samples if s.name == "ray_raggen_index_version_info" and s.labels["version"] == "v2"
    ]
    assert version_sample.labels["deployment"] == "Retriever" and version_sample.labels["application"] == APP_NAME


def test_per_deployment_resources_reach_serve(service):
    """What Serve's controller runs each deployment with (the data behind ``serve status``/the
    dashboard's Serve API), read back as Ray's public ServeInstanceDetails schema."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve.schema import ServeInstanceDetails

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = ServeInstanceDetails(**ray.get(controller.get_serve_instance_details.remote()))
    deployments = details.applications[APP_NAME].deployments
    got = {
        name: (d.deployment_config.ray_actor_options, d.deployment_config.autoscaling_config)
        for name, d in deployments.items()
    }
    actor, autoscaling = got["Retriever"]
    assert (actor.num_cpus, actor.num_gpus, actor.memory) == (0.15, 0, int(0.25 * GIB))
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 1)
    actor, autoscaling = got["Generator"]
    assert (actor.num_cpus, actor.num_gpus, actor.memory) == (0.2, 0, None)
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"], autoscaling["target_ongoing_requests"]) == (
        1,
        2,
        3,
    )
    actor, autoscaling = got["Ingress"]
    assert (actor.num_cpus, actor.num_gpus) == (0.05, 0) and autoscaling["max_replicas"] == 1
    assert "Reranker" not in got  # no reranker configured
