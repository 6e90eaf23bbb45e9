"""Every shipped config runs end to end on CPU with tiny models of the classes it names.

``raggen dry-run`` (``raggen.app.dry_run.run_dry_run``) against a real S3 server (moto on loopback):
Ray Data encoding -> FAISS shards -> publish to the config's own s3:// URIs -> 2 Ray Train steps
on 2 workers -> eval of the exported checkpoint -> Ray Serve answers one question over HTTP. The
Serve config (configs/serve.yaml) is deployed as it is, on the documents rehearsal's index.

The quickstart config's rehearsal runs in ``test_job_submit`` instead, step by step with its
``--print-overrides`` lines as submitted jobs (a rehearsal costs ~100 s of a CPU-bound suite, and
that test submits the quickstart's encode and train jobs anyway).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from raggen.app.dry_run import model_fields, run_dry_run
from raggen.config import load_config
from raggen.index import read_manifest, verify_index
from raggen.models.loading import declared_architecture
from raggen.models.stand_ins import architecture_of, is_available_here
from raggen.storage import s3_client

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RAGGEN_CONFIGS = [p for p in CONFIGS if "applications" not in yaml.safe_load(p.read_text())]
SERVE_CONFIGS = [p for p in CONFIGS if p not in RAGGEN_CONFIGS]
REHEARSED_AS_JOBS = {"quickstart.yaml"}  # tests/integration/test_job_submit.py
IN_PROCESS = [p for p in RAGGEN_CONFIGS if p.name not in REHEARSED_AS_JOBS]
SERVED_INDEX_FROM = REPO / "configs" / "documents.yaml"  # a MiniLM (mean-pooled) index, as serve.yaml's encoder


def _buckets(path: Path) -> set[str]:
    return set(re.findall(r"s3://([a-z0-9.-]+)/", path.read_text()))


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory, moto_s3, ray_with_credentials):
    """Runs each config's dry run once (on first use) and keeps its report."""
    done: dict[str, dict] = {}

    def get(path: Path) -> dict:
        if path.name not in done:
            for bucket in _buckets(path):
                s3_client(moto_s3).create_bucket(Bucket=bucket)
            out = tmp_path_factory.mktemp(path.stem)
            # 260 passages (130 world entities): "a few hundred", over the 256 vectors that the shared
            # quantizer of wiki-dpr's PQ64 (256 centroids per sub-space) needs to train
            done[path.name] = run_dry_run(str(path), out, s3_endpoint=moto_s3["endpoint_url"], num_passages=260)
            print(f"dry run of {path.name}: seconds per stage {done[path.name]['seconds']}")  # pytest -s shows it
        return done[path.name]

    return get


@pytest.fixture(autouse=True)
def _cwd_and_no_token(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name repo-relative models (raggen/assets/reader)
    monkeypatch.delenv("RAGGEN_API_TOKEN", raising=False)


def test_every_shipped_config_is_rehearsed_somewhere():
    """A new config is rehearsed in process unless listed; a listed one must exist and be rehearsed
    by the job test under its name."""
    names = {p.name for p in RAGGEN_CONFIGS}
    assert REHEARSED_AS_JOBS <= names
    job_tests = (REPO / "tests" / "integration" / "test_job_submit.py").read_text()
    assert all(f'"configs/{name}"' in job_tests and "--print-overrides" in job_tests for name in REHEARSED_AS_JOBS)
    assert SERVED_INDEX_FROM in IN_PROCESS


@pytest.mark.parametrize("path", IN_PROCESS, ids=lambda p: p.name)
def test_shipped_config_runs_end_to_end_with_tiny_models_of_its_classes(path, rehearsals, moto_s3):
    report = rehearsals(path)
    cfg = load_config(path, report["overrides"])
    original = load_config(path)

    # every model was the class the real config names (a stand-in of it, or the model itself)
    for field, name in model_fields(original).items():
        used = model_fields(cfg)[field]
        if not is_available_here(name):
            assert declared_architecture(used) == architecture_of(name), field

    # the index went through Ray Data into the config's own store and verifies there
    store_opts = {**moto_s3} if cfg.index.output.startswith("s3://") else None
    manifest = verify_index(cfg.index.output, s3_options=store_opts)
    assert manifest.version == report["index"]["version"] and manifest.num_passages == report["index"]["passages"] > 200
    assert len(manifest.shards) == 2 and manifest.faiss_factory == cfg.index.faiss_factory
    assert manifest.encoder.pooling == original.index.encoder.pooling
    want_format = "pair" if architecture_of(original.index.encoder.name_or_path).startswith("DPR") else "joined"
    assert manifest.encoder.passage_format == want_format

    # two Ray Train steps of the configured estimator, exported where serve.model_dir expects it
    assert report["train"]["metrics"]["step"] == 2
    if original.serve.model_dir:
        assert report["train"]["final"] == cfg.serve.model_dir
    scores = report["eval"]
    assert scores["index_version"] == manifest.version
    assert all(0.0 <= scores[k] <= 1.0 for k in scores if k.startswith(("em", "f1", "recall")))

    # Serve answered over HTTP with evidence from that version
    answer = report["answer"]
    assert answer["index_version"] == manifest.version
    assert 1 <= len(answer["passages"]) <= 2 and all(p["id"] and p["text"] for p in answer["passages"])
    assert isinstance(answer["answer"], str)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_shipped_serve_config_deploys_as_it_is_and_answers(path, rehearsals):
    """The Serve config's own args (models, limits, batching), only the index pointed at a rehearsal's."""
    from ray import serve

    from raggen.serve.app import deploy_config, wait_until_running, with_index
    from raggen.serve.client import ask

    index = load_config(SERVED_INDEX_FROM, rehearsals(SERVED_INDEX_FROM)["overrides"]).index.output
    config = yaml.safe_load(path.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": _free_port()}
    for app in config["applications"]:
        app["args"].update(
            index=index,
            replica_num_cpus=0.1,
            autoscaling={**app["args"].get("autoscaling", {}), "min_replicas": 1, "max_replicas": 1},
        )
    config = with_index(config, index)
    try:
        deploy_config(config)
        wait_until_running(config["applications"][0]["name"])
        url = f"http://127.0.0.1:{config['http_options']['port']}"
        reply = ask(url, "Where was the first passage's subject born?", top_k=2, max_new_tokens=8, timeout=120.0)
    finally:
        serve.shutdown()
    assert reply["index_version"] == read_manifest(index).version
    assert len(reply["passages"]) == 2
