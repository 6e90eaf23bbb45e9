"""``raggen index refresh`` / ``jobs/refresh.py`` on a real Ray and an S3 server (moto on loopback):
a small index on S3 re-encoded with a checkpoint's passage encoder becomes a new LATEST that
verifies, whose manifest names that encoder and whose vectors are that encoder's; the old version is
untouched. Plus, without Ray: which encoder a checkpoint gives, and documents chunked on S3."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from raggen.cli import main
from raggen.errors import ConfigError

pytestmark = pytest.mark.integration


def _checkpoint(path, models: dict[str, str], config: dict | None = None) -> str:
    """A training checkpoint folder holding ``models`` ({name: tiny encoder folder})."""
    from raggen.models import TextEncoder
    from raggen.train.checkpointing import write_checkpoint

    encoders = {name: TextEncoder.from_pretrained(src) for name, src in models.items()}
    write_checkpoint(path, models=encoders, step=3, config_yaml=yaml.safe_dump(config) if config else None)
    return str(path)


def _publish_v1(root: str, passages_file, encoder: str, work, s3) -> None:
    """Version v1 of ``root``: the passages encoded with ``encoder`` in-process, one Flat shard."""
    from raggen.corpus.readers import read_passages
    from raggen.index import (
        build_shard_index,
        make_manifest,
        passages_table,
        publish_version,
        write_parquet_atomic,
    )
    from raggen.index.shard import write_index_file
    from raggen.models import TextEncoder

    psg = read_passages(passages_file)
    xb = (
        TextEncoder.from_pretrained(encoder, pooling="mean", max_length=64)
        .encode_passages(psg["title"].tolist(), psg["text"].tolist())
        .numpy()
    )  # (n, d)
    rows = np.arange(len(psg), dtype=np.int64)
    work.mkdir()
    write_index_file(build_shard_index(xb, rows), work / "s0.faiss")
    write_parquet_atomic(
        passages_table(rows, psg["id"].tolist(), psg["title"].tolist(), psg["text"].tolist(), xb), work / "s0.parquet"
    )
    manifest = make_manifest(
        "v1",
        encoder_name_or_path=encoder,
        pooling="mean",
        dim=xb.shape[1],
        metric="ip",
        faiss_factory="Flat",
        shard_files=[(work / "s0.faiss", work / "s0.parquet", len(psg))],
    )
    publish_version(root, manifest, work, s3_options=s3)


def test_refresh_on_s3_publishes_a_new_latest_encoded_with_the_checkpoints_passage_encoder(
    tmp_path, s3_bucket, ray_with_credentials
):
    from raggen.corpus.readers import read_passages
    from raggen.corpus.world import WorldConfig, write_world
    from raggen.index import (
        embeddings_of,
        load_version,
        read_latest,
        read_manifest,
        verify_index,
    )
    from raggen.models import TextEncoder, make_tiny_encoder
    from raggen.storage import upload_dir, write_bytes

    bucket, s3 = s3_bucket
    files = write_world(tmp_path / "world", WorldConfig(num_entities=20, seed=0))
    write_bytes(f"s3://{bucket}/corpus/passages.tsv", files.passages_v1.read_bytes(), s3)
    old_encoder = make_tiny_encoder(str(tmp_path / "encoder-a"), seed=0)
    trained = make_tiny_encoder(str(tmp_path / "encoder-b"), seed=1)  # "trained": other weights, same shape
    upload_dir(
        _checkpoint(tmp_path / "final", {"passage_encoder": trained, "query_encoder": old_encoder}),
        f"s3://{bucket}/runs/r/final",
        s3,
    )
    root = f"s3://{bucket}/index"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"index": {
        "passages": f"s3://{bucket}/corpus/passages.tsv", "output": root, "version": "v1",
        "encoder": {"name_or_path": old_encoder, "pooling": "mean", "max_length": 64},
        "batch_size": 16, "num_shards": 2, "num_actors": 1, "actor_num_cpus": 0.5,
        "s3": {"endpoint_url": s3["endpoint_url"], "region": "us-east-1"},
    }}))  # fmt: skip

    _publish_v1(root, files.passages_v1, old_encoder, tmp_path / "v1", s3)  # without Ray: the test times one pipeline
    assert read_latest(root, s3) == "v1"
    assert main(["index", "refresh", str(config), "--encoder", f"s3://{bucket}/runs/r/final"]) == 0

    new = read_manifest(root, s3_options=s3)  # LATEST
    assert new.version != "v1" and read_latest(root, s3) == new.version
    assert new.encoder.name_or_path == f"s3://{bucket}/runs/r/final/passage_encoder"
    assert verify_index(root, s3_options=s3) == new  # every checksum, in the store
    assert verify_index(root, version="v1", s3_options=s3).encoder.name_or_path == old_encoder  # untouched
    passages = read_passages(files.passages_v1)
    assert new.num_passages == len(passages)

    # the vectors are the trained encoder's, not the old one's
    loaded = load_version(root, s3_options=s3, cache_dir=tmp_path / "cache")
    tables = [s.passages for s in loaded.shards]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    xb = np.concatenate([embeddings_of(t) for t in tables])  # (n, d)
    row = passages.set_index("id").loc[ids]
    for name, close in ((trained, True), (old_encoder, False)):
        enc = TextEncoder.from_pretrained(name, pooling="mean", max_length=64)
        want = enc.encode_passages(row["title"].tolist(), row["text"].tolist()).numpy()
        assert np.allclose(xb, want, atol=1e-4) == close, name


def test_a_checkpoint_gives_its_passage_encoder_or_a_shared_runs_query_encoder(tmp_path, monkeypatch):
    from raggen.app.indexing import resolve_refresh_encoder
    from raggen.config import load_config
    from raggen.models import make_tiny_encoder

    enc = make_tiny_encoder(str(tmp_path / "enc"))
    cfg = load_config(None)  # index.encoder == model.query_encoder: MiniLM on both sides (shared)
    with_passage = _checkpoint(tmp_path / "a", {"passage_encoder": enc, "query_encoder": enc})
    got = resolve_refresh_encoder(with_passage, cfg)
    assert got.name_or_path == os.path.join(with_passage, "passage_encoder") and got.role == "passage_encoder"
    assert resolve_refresh_encoder(with_passage, cfg, role="query").role == "query_encoder"

    shared = _checkpoint(
        tmp_path / "b",
        {"query_encoder": enc},
        config={"index": {"encoder": {"name_or_path": "m"}}, "model": {"query_encoder": {"name_or_path": "m"}}},
    )
    assert resolve_refresh_encoder(shared, cfg).name_or_path == os.path.join(shared, "query_encoder")

    dpr = {"index": {"encoder": {"name_or_path": "ctx"}}, "model": {"query_encoder": {"name_or_path": "question"}}}
    separate = _checkpoint(tmp_path / "c", {"query_encoder": enc}, config=dpr)
    with pytest.raises(ConfigError, match="no passage_encoder/"):
        resolve_refresh_encoder(separate, cfg)  # a frozen passage encoder: nothing to refresh with
    assert resolve_refresh_encoder(separate, cfg, role="query").role == "query_encoder"
    with pytest.raises(ConfigError, match="no passage_encoder/"):
        resolve_refresh_encoder(separate, cfg, role="passage")

    # not a checkpoint: a model folder or a hub id, as it is
    assert (
        resolve_refresh_encoder(enc, cfg).name_or_path == enc and resolve_refresh_encoder(enc, cfg).checkpoint is None
    )
    assert resolve_refresh_encoder("org/some-encoder", cfg).name_or_path == "org/some-encoder"
    # a relative path, as typed after `cd`: recorded absolute (the manifest is read from other folders)
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        assert resolve_refresh_encoder("enc", cfg).name_or_path == enc
        got = resolve_refresh_encoder("a", cfg)
        assert got.checkpoint == with_passage and got.name_or_path == os.path.join(with_passage, "passage_encoder")
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        resolve_refresh_encoder(enc, cfg, role="passage")


def test_the_refresh_job_refuses_a_bad_config_with_one_line(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "jobs" / "refresh.py"
    spec = importlib.util.spec_from_file_location("_refresh_job", script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    bad = tmp_path / "bad.yaml"
    bad.write_text("index: {chunk_words: 10, chunk_overlap: 12}\n")
    assert job.main([str(bad), "--encoder", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refresh: error:") and "chunk_overlap" in err and len(err.strip().splitlines()) == 1


def test_documents_on_s3_are_chunked_into_an_s3_chunk_dir(tmp_path, s3_bucket):
    import pandas as pd

    from raggen.corpus.documents import DocumentSettings, prepare_documents
    from raggen.storage import download, write_bytes

    bucket, s3 = s3_bucket
    text = " ".join(f"w{i}" for i in range(150))
    write_bytes(f"s3://{bucket}/docs/a.md", f"# Alpha\n\n{text}\n".encode(), s3)
    write_bytes(f"s3://{bucket}/docs/sub/b.txt", b"short text", s3)
    settings = DocumentSettings(chunk_dir=f"s3://{bucket}/chunks")
    out = prepare_documents(f"s3://{bucket}/docs", settings, s3)
    assert out.startswith(f"s3://{bucket}/chunks/") and out.endswith("/passages.parquet")
    download(out.rsplit("/", 1)[0], tmp_path / "got", s3)
    psg = pd.read_parquet(tmp_path / "got" / "passages.parquet")
    assert psg.id.tolist() == ["a.md#0", "a.md#100", "sub/b.txt#0"]
    assert psg.title.tolist() == ["Alpha", "Alpha", "b"]
    assert psg.text[1].split() == text.split()[100:]  # the "# Alpha" heading is the title, not passage words
    assert prepare_documents(f"s3://{bucket}/docs", settings, s3) == out  # reused


def test_a_service_watching_latest_switches_to_the_refreshed_version_without_a_failed_request(
    tmp_path, s3_bucket, ray_with_credentials, monkeypatch
):
    """Serve (watch_latest on the S3 root) answers a steady stream of questions while
    `raggen index refresh` re-encodes and publishes next to it: every request gets a 200, the
    answers' index version moves once from v1 to the refreshed one."""
    import socket
    import threading
    import time

    import httpx
    from ray import serve

    from raggen.corpus.world import WorldConfig, write_world
    from raggen.index import read_latest
    from raggen.models import make_tiny_encoder, make_tiny_generator
    from raggen.serve.app import deploy_config, serve_deploy_config, wait_until_running
    from raggen.storage import upload_dir, write_bytes

    monkeypatch.delenv("RAGGEN_API_TOKEN", raising=False)
    bucket, s3 = s3_bucket
    files = write_world(tmp_path / "world", WorldConfig(num_entities=20, seed=2))
    write_bytes(f"s3://{bucket}/corpus/passages.tsv", files.passages_v1.read_bytes(), s3)
    encoder = make_tiny_encoder(str(tmp_path / "encoder-a"), seed=0)
    trained = make_tiny_encoder(str(tmp_path / "encoder-b"), seed=1)
    upload_dir(_checkpoint(tmp_path / "final", {"passage_encoder": trained}), f"s3://{bucket}/runs/r/final", s3)
    root = f"s3://{bucket}/index"
    _publish_v1(root, files.passages_v1, encoder, tmp_path / "v1", s3)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"index": {
        "passages": f"s3://{bucket}/corpus/passages.tsv", "output": root,
        "encoder": {"name_or_path": encoder, "pooling": "mean", "max_length": 64}, "batch_size": 16,
        "num_shards": 1, "num_actors": 1, "actor_num_cpus": 0.5,
        "s3": {"endpoint_url": s3["endpoint_url"], "region": "us-east-1"},
    }}))  # fmt: skip

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = {"index": root, "watch_latest": True, "watch_interval_s": 0.5,
            "s3": {"endpoint_url": s3["endpoint_url"], "region_name": "us-east-1"},
            "query_encoder": {"name_or_path": encoder, "pooling": "mean", "max_length": 32},
            "generator": make_tiny_generator(str(tmp_path / "gen")), "max_source_length": 64, "max_target_length": 6,
            "num_beams": 1, "default_top_k": 2, "max_new_tokens": 4, "replica_num_cpus": 0.1, "ingress_num_cpus": 0.05,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}  # fmt: skip
    credentials = {"AWS_ACCESS_KEY_ID": s3["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": s3["aws_secret_access_key"]}
    deploy_config(serve_deploy_config(args, host="127.0.0.1", port=port, runtime_env={"env_vars": credentials}))
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()
    url = f"http://127.0.0.1:{port}"

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post("/v1/answer", json={"question": "Where was Tomas born?", "top_k": 2})
                except httpx.HTTPError:
                    seen.append((0, None))
                    continue
                seen.append((r.status_code, r.json().get("index_version") if r.status_code == 200 else None))

    def wait(predicate, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.25)

    thread = threading.Thread(target=client, daemon=True)
    try:
        wait_until_running(timeout_s=300)
        thread.start()
        wait(lambda: any(st == 200 for st, _ in seen), 120)  # the service is up
        start = len(seen)  # from here on, every request must succeed
        assert main(["index", "refresh", str(config), "--encoder", f"s3://{bucket}/runs/r/final"]) == 0
        new = read_latest(root, s3)
        wait(lambda: sum(v == new for _, v in seen[start:]) >= 3, 60)
    finally:
        stop.set()
        thread.join(timeout=60) if thread.is_alive() else None
        serve.shutdown()
    during = seen[start:]
    assert during and [st for st, _ in during] == [200] * len(during), [x for x in during if x[0] != 200][:3]
    versions = [v for _, v in during]
    assert new != "v1" and new in versions, versions[-3:]
    first = versions.index(new)
    assert first > 0 and versions == ["v1"] * first + [new] * (len(versions) - first)
