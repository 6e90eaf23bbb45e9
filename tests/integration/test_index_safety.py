"""Index storage safety with a real Ray and a real S3 API (moto server on loopback):

(a) a byte flipped in an S3 object after a first verify passed: ``verify`` (and the CLI) refuse,
    naming the file; the local cache filled by the first verify does not hide it;
(b) a publisher killed (SIGKILL) mid-upload, then a rerun: only complete versions are listed,
    every listed version verifies, LATEST stays valid;
(c) concurrent publishers on one root: one version per name, LATEST never moves back;
(d) a user's non-empty folder given as work_dir is refused and never deleted; an empty one and a
    shared split_uri keep everything that was there before;
and the Ray Data path rejects malformed rows and empty passages with the readers' messages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from raggen.errors import ConfigError, DataError, IndexIntegrityError
from raggen.index import manifest as M
from raggen.index import shard as S
from raggen.index.latest import list_versions, read_latest
from raggen.index.loading import load_version, verify_version
from raggen.index.passage_table import passages_table, write_parquet_atomic
from raggen.index.publish import publish_version, set_latest
from raggen.storage import download, open_store, s3_client

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def atomic_moto():
    """S3 checks a conditional PUT and stores the object in one step; moto's server checks, then
    stores, in two, so that two threads can both pass the check. Serialising moto's PutObject
    handler gives the emulator S3's guarantee (raggen and boto3 are untouched)."""
    from moto.s3.responses import S3Response

    original, lock = S3Response.put_object, threading.Lock()

    def put_object(self):
        with lock:
            return original(self)

    S3Response.put_object = put_object
    try:
        yield
    finally:
        S3Response.put_object = original


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from raggen.models import make_tiny_encoder

    return make_tiny_encoder(str(tmp_path_factory.mktemp("enc") / "enc"), d_model=32, heads=2)


def write_corpus(path: Path, n: int = 30, text: str = "passage {i} is about the river") -> Path:
    path.write_text("id\ttext\ttitle\n" + "".join(f"{i}\t{text.format(i=i)}\tT{i}\n" for i in range(n)))
    return path


def make_version(out: Path, version: str, *, n: int = 40, d: int = 8, seed: int = 0, created: str | None = None):
    """Two Flat shards of random vectors written to ``out``; returns their manifest."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    files = []
    for s, rows in enumerate(np.array_split(np.arange(n), 2)):
        ids = (np.int64(s) << 40) + np.arange(len(rows), dtype=np.int64)
        index_name, passages_name = M.shard_file_names(s)
        S.write_index_file(S.build_shard_index(xb[rows], ids), out / index_name)
        write_parquet_atomic(passages_table(ids, [f"{seed}-{r}" for r in rows], [""] * len(rows),
                                            [f"text {r}" for r in rows], xb[rows]), out / passages_name)  # fmt: skip
        files.append((out / index_name, out / passages_name, len(rows)))
    m = M.make_manifest(version, encoder_name_or_path="e", pooling="mean", dim=d, metric="ip", faiss_factory="Flat",
                        shard_files=files)  # fmt: skip
    return m.model_copy(update={"created": created}) if created else m


def root_uri(kind: str, tmp_path: Path, s3_bucket) -> tuple[str, dict | None]:
    if kind == "local":
        return str(tmp_path / "root"), None
    bucket, options = s3_bucket
    return f"s3://{bucket}/index", options


# ------------------------------------------------------------------------------------------ the Ray Data path


def test_ray_path_rejects_malformed_and_empty_rows_with_the_readers_messages(ray_cluster, tmp_path, tiny_encoder):
    from raggen.corpus.readers import read_passages
    from raggen.index import IndexBuildSettings, encode_passages
    from raggen.models.retriever import EncoderSpec

    cases = {"fields.tsv": "id\ttext\ttitle\n1\ta\tt\n2\tb\n", "blank.tsv": "id\ttext\ttitle\n1\ta\tt\n2\t  \tt\n",
             "noid.jsonl": '{"id": "1", "text": "a"}\n{"id": " ", "text": "b"}\n'}  # fmt: skip
    expected = {
        "fields.tsv": "line 3: expected 3 tab-separated fields (id, text, title), found 2",
        "blank.tsv": "line 3: empty passage text (id '2')",
        "noid.jsonl": "line 2: empty passage id",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(DataError) as ray_err:
            encode_passages(str(path), tmp_path / f"work-{name}", encoder=EncoderSpec(name_or_path=tiny_encoder,
                            max_length=16), settings=IndexBuildSettings(num_shards=1, num_actors=1, actor_num_cpus=0.25))  # fmt: skip
        with pytest.raises(DataError) as reader_err:
            read_passages(path)
        assert str(ray_err.value) == str(reader_err.value) == f"{path}: {expected[name]}"


# ------------------------------------------------------------------------------------------ (d) + (a)


def test_user_folders_survive_and_verify_reads_the_s3_object_not_the_cache(
    ray_cluster, tmp_path, s3_bucket, tiny_encoder, monkeypatch, capsys
):
    from raggen.cli import main
    from raggen.index import IndexBuildSettings, build_index, load_version, verify_index
    from raggen.models.retriever import EncoderSpec

    bucket, options = s3_bucket
    corpus = write_corpus(tmp_path / "passages.tsv")
    root = f"s3://{bucket}/index"
    kwargs = dict(encoder=EncoderSpec(name_or_path=tiny_encoder, max_length=16),
                  settings=IndexBuildSettings(num_shards=2, actor_num_cpus=0.25), s3_options=options, version="v1")  # fmt: skip

    # (d) a non-empty folder that raggen did not make: refused up front, every file kept
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "projects" / "thesis.tex").write_text("years of work")
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"work_dir: .*home is not empty and was not created by raggen"):
        build_index(str(corpus), root, work_dir=home, **kwargs)
    assert (home / "projects" / "thesis.tex").read_text() == "years of work" and (
        home / "notes.txt"
    ).read_text() == "keep me"

    # an empty folder of the user's and a shared split folder with the user's files in it
    empty = tmp_path / "empty-work"
    empty.mkdir()
    shared = tmp_path / "shared-split"
    shared.mkdir()
    (shared / "other-job.parquet").write_bytes(b"not raggen's")
    manifest = build_index(str(corpus), root, work_dir=empty, split_uri=str(shared), **kwargs)
    assert manifest.num_passages == 30 and read_latest(root, options) == "v1"
    assert empty.is_dir() and list(empty.iterdir()) == []  # raggen's files gone, the user's folder kept
    assert sorted(p.name for p in shared.iterdir()) == ["other-job.parquet"]
    assert (shared / "other-job.parquet").read_bytes() == b"not raggen's"

    # (a) verify passes, filling the cache; then one byte of a stored shard flips on S3
    cache = tmp_path / "cache"
    assert verify_index(root, s3_options=options, cache_dir=cache).version == "v1"
    cached = cache / bucket / "index" / "v1" / "shard-00001.faiss"
    assert cached.is_file()
    client = s3_client(options)
    key = "index/v1/shard-00001.faiss"
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(IndexIntegrityError, match=rf"s3://{bucket}/index/v1/shard-00001\.faiss: sha256 mismatch"):
        verify_index(root, s3_options=options, cache_dir=cache)
    with pytest.raises(IndexIntegrityError, match=r"shard-00001\.faiss: sha256 mismatch"):
        set_latest(root, "v1", s3_options=options)  # set_latest verifies the store too

    # the CLI, through its own config and the AWS environment, says the same in one line
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAGGEN_CACHE_DIR", str(cache))
    capsys.readouterr()
    code = main(["index", "verify", root, "--set", f"index.s3.endpoint_url={options['endpoint_url']}"])
    err = capsys.readouterr().err
    assert code == 2 and "shard-00001.faiss: sha256 mismatch" in err and "all checksums match" not in err
    with pytest.raises(IndexIntegrityError, match=r"shard-00001\.faiss: sha256 mismatch"):
        load_version(root, s3_options=options, cache_dir=tmp_path / "fresh-cache")  # a cold cache loads the store


# ------------------------------------------------------------------------------------------ (b) kill -9 mid-publish

DRIVER = textwrap.dedent("""
    import json, sys
    from raggen.index.manifest import Manifest
    from raggen.index.publish import publish_version
    root, local, manifest, options = sys.argv[1:5]
    publish_version(root, Manifest.model_validate_json(open(manifest).read()), local,
                    s3_options=json.loads(options) or None)
    print("finished", flush=True)
""")


@pytest.fixture(scope="module")
def big_version(tmp_path_factory):
    """Two shards of ~8 MB each (30k 64-d vectors, stored twice): an upload that takes a moment."""
    out = tmp_path_factory.mktemp("big")
    return out, make_version(out, "v-big", n=30_000, d=64, seed=7)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_publisher_killed_mid_upload_leaves_only_complete_versions(kind, tmp_path, s3_bucket, big_version):
    root, options = root_uri(kind, tmp_path, s3_bucket)
    publish_version(root, make_version(tmp_path / "v0", "v0", created="2026-01-01T00:00:00Z"), tmp_path / "v0",
                    s3_options=options)  # fmt: skip
    local, manifest = big_version
    (tmp_path / "m.json").write_text(manifest.to_json())
    store = open_store(root, options)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, root, str(local), str(tmp_path / "m.json"),
                             json.dumps(options or {})], cwd=REPO, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not store.exists(f"v-big/{M.CLAIM_NAME}"):  # the publisher claimed the version: uploads start
            assert proc.poll() is None and time.monotonic() < deadline, "the publisher never started"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not store.exists(f"v-big/{M.MANIFEST_NAME}")  # killed before its commit point
    assert list_versions(root, options) == ["v0"]  # the unfinished upload is not a version
    assert read_latest(root, options) == "v0" and verify_version(root, s3_options=options).version == "v0"
    with pytest.raises(IndexIntegrityError, match=r"v-big/manifest\.json: missing"):
        load_version(root, "v-big", s3_options=options)

    # the rerun takes the dead publisher's claim over (same host, its pid is gone) and finishes
    publish_version(root, manifest, local, s3_options=options)
    assert list_versions(root, options) == ["v-big", "v0"] and read_latest(root, options) == "v-big"
    for version in list_versions(root, options):
        verify_version(root, version, s3_options=options, cache_dir=tmp_path / "cache")
    assert not store.exists(f"v-big/{M.CLAIM_NAME}")


# ------------------------------------------------------------------------------------------ (c) concurrent publishers


def _together(fns):
    results, barrier = [None] * len(fns), threading.Barrier(len(fns))

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - inspected below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_publishers_one_version_per_name_latest_never_back(kind, tmp_path, s3_bucket, atomic_moto):
    root, options = root_uri(kind, tmp_path, s3_bucket)
    publish_version(root, make_version(tmp_path / "v0", "v0", created="2026-01-01T00:00:00Z"), tmp_path / "v0",
                    s3_options=options)  # fmt: skip
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(read_latest(root, options))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # different names, created in this order, published all at once (newest first in line)
        news = [
            make_version(tmp_path / f"v{i}", f"v{i}", seed=i, created=f"2026-01-0{i + 1}T00:00:00Z") for i in (1, 2, 3)
        ]
        results = _together([lambda m=m: publish_version(root, m, tmp_path / m.version, s3_options=options)
                             for m in reversed(news)])  # fmt: skip
        assert all(isinstance(r, M.Manifest) for r in results), results
        # one name, two different contents, at once
        same = [make_version(tmp_path / f"s{i}", "v-same", seed=10 + i, n=3000, created="2025-06-01T00:00:00Z")
                for i in range(2)]  # fmt: skip
        results = _together([lambda i=i: publish_version(root, same[i], tmp_path / f"s{i}", s3_options=options)
                             for i in range(2)])  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    won = [r for r in results if isinstance(r, M.Manifest)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], ConfigError) and "'v-same'" in str(lost[0]), results
    assert verify_version(root, "v-same", s3_options=options, cache_dir=tmp_path / "c") == won[0]
    assert list_versions(root, options) == ["v-same", "v0", "v1", "v2", "v3"]
    assert read_latest(root, options) == "v3"  # v-same is older (created): LATEST did not move back to it
    order = [int(v[1:]) for v in seen if v]
    assert order == sorted(order) and order[0] >= 0, order  # every reader saw LATEST move forward only


# ------------------------------------------------------------------------------------------ unsafe S3 keys


def test_download_refuses_keys_that_would_leave_the_folder(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    client = s3_client(options)
    client.put_object(Bucket=bucket, Key="ver/ok.bin", Body=b"ok")
    client.put_object(Bucket=bucket, Key="ver/../../escaped.bin", Body=b"evil")
    target = tmp_path / "a" / "b" / "download"
    with pytest.raises(ValueError, match=r"refusing to download unsafe object name '\.\./\.\./escaped\.bin'"):
        download(f"s3://{bucket}/ver", target, s3_options=options)
    assert not target.exists() and not (tmp_path / "a" / "escaped.bin").exists()
    client.delete_object(Bucket=bucket, Key="ver/../../escaped.bin")
    client.put_object(Bucket=bucket, Key="ver/sub//x.bin", Body=b"x")
    with pytest.raises(ValueError, match="unsafe object name 'sub//x.bin'"):
        download(f"s3://{bucket}/ver", target, s3_options=options)
