"""Local stores: atomic writes, listing, copies, hashing, URI helpers (S3 is covered in integration)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from raggen import storage
from raggen.storage import LocalStore, S3Options, S3Store, atomic_write_bytes, open_store


def test_open_store_picks_the_backend(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    store = open_store(
        "s3://bucket-name/some/prefix/", {"endpoint_url": "http://127.0.0.1:1", "region_name": "eu-west-1"}
    )
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri) == ("bucket-name", "some/prefix", "s3://bucket-name/some/prefix")
    assert store._key("a/b.txt") == "some/prefix/a/b.txt"


def test_split_and_join_uris():
    assert storage.split_s3_uri("s3://b/x/y/") == ("b", "x/y")
    assert storage.split_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3_uri("s3:///key")
    assert storage.join_uri("s3://b/root/", "v1", "manifest.json") == "s3://b/root/v1/manifest.json"
    assert storage.join_uri("/tmp/root", "v1") == os.path.join("/tmp/root", "v1")


def test_write_read_exists_list_delete(tmp_path):
    store = LocalStore(tmp_path / "root")
    assert store.list() == [] and not store.exists("a.txt")
    store.write_bytes("a.txt", b"one")
    store.write_bytes("v1/b.bin", b"\x00\x01")
    assert store.read_bytes("a.txt") == b"one" and store.exists("v1/b.bin")
    assert store.list() == ["a.txt", "v1/b.bin"] and store.list("v1") == ["v1/b.bin"]
    store.delete("v1")
    assert store.list() == ["a.txt"]


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "LATEST"
    atomic_write_bytes(target, b"v1\n")
    inode_before = target.stat().st_ino
    atomic_write_bytes(target, b"v2\n")
    assert target.read_bytes() == b"v2\n"
    assert target.stat().st_ino != inode_before  # a new file was renamed over it, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST"]


def test_failed_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "LATEST"
    atomic_write_bytes(target, b"v1\n")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]  (write fails midway)
    assert target.read_bytes() == b"v1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST"]


def test_names_cannot_escape_the_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    with pytest.raises(ValueError, match="escapes"):
        store.write_bytes("../outside.txt", b"x")
    assert not (tmp_path / "outside.txt").exists()


def test_upload_download_dir_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(1000))
    (src / "sub" / "b.bin").write_bytes(b"b")
    names = storage.upload_dir(src, str(tmp_path / "remote"))
    assert names == ["a.bin", "sub/b.bin"]
    paths = storage.download(str(tmp_path / "remote"), tmp_path / "back")
    assert [p.relative_to(tmp_path / "back").as_posix() for p in paths] == names
    for name in names:
        assert Path(tmp_path / "back", name).read_bytes() == Path(src, name).read_bytes()


def test_uri_level_helpers(tmp_path):
    uri = str(tmp_path / "x" / "file.txt")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    assert storage.list_uri(str(tmp_path / "x")) == ["file.txt"]


def test_sha256_of_bytes_files_and_stored_objects(tmp_path):
    data = os.urandom(3 * storage.CHUNK // 2)  # spans two read chunks
    (tmp_path / "f").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert storage.sha256_bytes(data) == expected
    assert storage.sha256_file(tmp_path / "f") == expected
    assert storage.store_sha256(LocalStore(tmp_path), "f") == expected
    assert storage.sha256_bytes(data[:-1]) != expected


def test_s3_options_from_kwargs_and_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    env = S3Options().resolved()
    assert (env.endpoint_url, env.region_name, env.max_attempts) == ("http://127.0.0.1:9000", "eu-central-1", 7)
    explicit = S3Options.coerce({"endpoint_url": "http://127.0.0.1:1234", "max_attempts": 2}).resolved()
    assert (explicit.endpoint_url, explicit.max_attempts) == ("http://127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match="unknown field"):
        S3Options.coerce({"endpoint": "x"})
    client = storage.s3_client({"endpoint_url": "http://127.0.0.1:1234", "max_attempts": 3})
    assert client.meta.endpoint_url == "http://127.0.0.1:1234"
    assert client.meta.config.retries["total_max_attempts"] == 3
    fs = storage.pyarrow_s3_filesystem({"endpoint_url": "http://127.0.0.1:1234", "region_name": "us-west-2"})
    assert fs.region == "us-west-2"


def test_file_chunks_stop_at_the_limit_and_the_hashing_writer_hashes_what_it_wrote(tmp_path):
    import hashlib
    import io

    from raggen.storage import HashingWriter, iter_file_chunks

    data = bytes(range(256)) * 40  # 10240 bytes
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert b"".join(iter_file_chunks(f, size=1000, limit=2500)) == data[:2500]
        assert b"".join(iter_file_chunks(f, size=1000)) == data[2500:]  # the rest, from where it stopped
    with open(path, "rb") as f:
        assert b"".join(iter_file_chunks(f, size=1000, limit=10**6)) == data  # a limit past the end
    buf = io.BytesIO()
    out = HashingWriter(buf)
    out.write(data[:100])
    out.write(data[100:])
    assert buf.getvalue() == data and out.pos == len(data) and out.sha.hexdigest() == hashlib.sha256(data).hexdigest()
