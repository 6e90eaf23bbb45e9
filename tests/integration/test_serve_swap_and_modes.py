"""``raggen serve swap CONFIG --version V | --latest`` against a running Ray Serve app (tiny models):
the pin and the unpin go through the Retriever's ``user_config``; a version that does not verify
is refused by the service, which keeps serving, and the command exits 2 with one line. Then the
request's ``retrieval`` field (dense | sparse | hybrid) over a version with a BM25 index, and a 422
naming the field on a version without one."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from ray import serve

from raggen.cli import main  # noqa: E402
from raggen.index import manifest as M  # noqa: E402
from raggen.index import shard as S  # noqa: E402
from raggen.index.latest import read_latest
from raggen.index.passage_table import passages_table, write_parquet_atomic
from raggen.index.publish import publish_version
from raggen.index.shard_files import build_sparse_files  # noqa: E402

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _publish(
    root: str, out: Path, version: str, created: str, enc_path: str, encoder, seed: int, sparse: bool = True
) -> None:
    texts = [f"fact {seed}-{i}: entity{i} lives in town{i * 3 % 7}" for i in range(10)]
    xb = encoder.encode(texts).numpy().astype(np.float32)  # (n, d)
    ids = np.arange(len(texts), dtype=np.int64)
    out.mkdir(parents=True)
    index_name, passages_name = M.shard_file_names(0)
    S.write_index_file(S.build_shard_index(xb, ids), out / index_name)
    write_parquet_atomic(
        passages_table(ids, [f"{version}-{i}" for i in ids], [""] * len(texts), texts), out / passages_name
    )
    files = [(out / index_name, out / passages_name, len(texts))]
    sparse_files, params = build_sparse_files(files, out) if sparse else (None, None)
    m = M.make_manifest(
        version,
        encoder_name_or_path=enc_path,
        pooling="cls",
        dim=xb.shape[1],
        metric="ip",
        faiss_factory="Flat",
        shard_files=files,
        sparse_files=sparse_files,
        sparse_params=params,
    )
    publish_version(root, m.model_copy(update={"created": created}), out)


@pytest.fixture(scope="module")
def running(tmp_path_factory, ray_cluster):
    from raggen.app.serving import serve_from_config
    from raggen.config import load_config, with_absolute_paths
    from raggen.models.retriever import TextEncoder
    from raggen.models.tiny import make_tiny_encoder, make_tiny_generator

    tmp = tmp_path_factory.mktemp("swap")
    enc_path = make_tiny_encoder(str(tmp / "enc"))
    gen_path = make_tiny_generator(str(tmp / "gen"))
    encoder = TextEncoder.from_pretrained(enc_path, pooling="cls")
    root = str(tmp / "index")
    for i in (1, 2):
        _publish(root, tmp / f"b{i}", f"v{i}", f"2026-01-0{i}T00:00:00.000000Z", enc_path, encoder, seed=i)
    _publish(root, tmp / "b3", "v3", "2025-12-01T00:00:00.000000Z", enc_path, encoder, seed=3)  # older: LATEST stays v2
    _publish(root, tmp / "b0", "v0", "2025-11-01T00:00:00.000000Z", enc_path, encoder, seed=0, sparse=False)
    shard = Path(root, "v3", "shard-00000.parquet")
    shard.write_bytes(shard.read_bytes() + b"\0")  # v3 does not verify
    config, port = tmp / "serve.yaml", _free_port()
    config.write_text(f"""
model:
  query_encoder: {{name_or_path: {enc_path}, pooling: cls, max_length: 32}}
  generator: {gen_path}
  max_target_length: 8
serve:
  index: {root}
  port: {port}
  max_new_tokens: 4
  num_beams: 1
  replica_num_cpus: 0.1
  ingress_num_cpus: 0.05
  max_batch_size: 2
  autoscaling: {{min_replicas: 1, max_replicas: 1}}
""")
    try:
        serve_from_config(with_absolute_paths(load_config(str(config), [])), blocking=False)
        yield str(config), root, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _swap(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main(["serve", "swap", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err.strip()


def test_pin_then_unpin_then_a_refused_version(running, capsys):
    config, root, _ = running
    code, info, err = _swap(capsys, config, "--version", "v1")
    assert code == 0 and info["version"] == "v1", err
    code, info, err = _swap(capsys, config, "--latest")
    assert code == 0 and info["version"] == "v2" == read_latest(root), err
    code, info, err = _swap(capsys, config, "--version", "v3", "--timeout", "60")
    assert code == 2 and info["version"] == "v2" and info["last_error"]
    assert len(err.splitlines()) == 1 and "refused version 'v3' and keeps serving 'v2'" in err


def test_the_requests_retrieval_mode(running, capsys):
    import httpx

    config, root, url = running
    assert _swap(capsys, config, "--version", "v2")[0] == 0
    ask = {"question": "where does entity4 live?", "top_k": 3, "max_new_tokens": 2}
    got = {}
    for mode in ("dense", "sparse", "hybrid", None):
        body = ask if mode is None else {**ask, "retrieval": mode}
        r = httpx.post(f"{url}/v1/answer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got[mode] = r.json()
        # sparse: only passages sharing a word with the question are hits ("entity4", not "live")
        assert got[mode]["index_version"] == "v2" and len(got[mode]["passages"]) == (1 if mode == "sparse" else 3)
    assert got["sparse"]["passages"][0]["id"] == "v2-4"  # BM25 finds the exact words
    assert [p["id"] for p in got[None]["passages"]] == [p["id"] for p in got["dense"]["passages"]]  # the default
    assert got["hybrid"]["passages"][0]["score"] <= 1.0  # fused scores (weighted: at most the weights' sum)
    r = httpx.post(f"{url}/v1/answer", json={**ask, "retrieval": "bm42"}, timeout=60)
    assert r.status_code == 422 and "retrieval" in r.json()["error"]
    assert _swap(capsys, config, "--version", "v0")[0] == 0  # a version without a BM25 index
    r = httpx.post(f"{url}/v1/answer", json={**ask, "retrieval": "sparse"}, timeout=60)
    assert (
        r.status_code == 422
        and r.json()["error"].startswith("retrieval: ")
        and "index.sparse: bm25" in r.json()["error"]
    )
    assert httpx.post(f"{url}/v1/answer", json={**ask, "retrieval": "dense"}, timeout=60).status_code == 200
