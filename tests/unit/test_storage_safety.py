"""raggen.storage's safety rails: names that would escape a root, the per-root lock (a killed
holder never blocks), conditional writes on a folder, folders raggen owns (marker files) and the
content fingerprint that tells a changed input from an unchanged one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from raggen import storage
from raggen.errors import ConfigError
from raggen.storage import FileLock, LocalStore, PreconditionFailed, S3Store, StoreBusy

# ------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "bad", ["..", "../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "./a", "a/", "a\\..\\b", "C:/x", "a\x00b"]
)
def test_unsafe_names_are_refused_everywhere_a_key_is_joined(tmp_path, bad):
    with pytest.raises(ValueError, match="escapes the store root"):
        storage.check_relative_name(bad)
    with pytest.raises(ValueError):
        LocalStore(tmp_path).write_bytes(bad, b"x")
    with pytest.raises(ValueError):
        S3Store("s3://bucket/root", {"endpoint_url": "http://127.0.0.1:1"})._key(bad)
    if bad not in ("a/",):  # join_uri tolerates one trailing '/'
        with pytest.raises(ValueError):
            storage.join_uri("s3://bucket/root", bad)
        with pytest.raises(ValueError):
            storage.join_uri(str(tmp_path), bad)
    assert list(tmp_path.iterdir()) == []


def test_safe_names_and_prefixes_pass():
    assert storage.join_uri("s3://b/root/", "v1", "manifest.json") == "s3://b/root/v1/manifest.json"
    assert storage.join_uri("s3://b/root", "runs/r1/", "") == "s3://b/root/runs/r1"
    assert storage.split_s3_uri("s3://b/a/b/") == ("b", "a/b")
    for bad in ("s3://b/a/../c", "s3://b//a", "s3://b/a//c", "s3://b/./a"):
        with pytest.raises(ValueError, match="unsafe S3 prefix"):
            storage.split_s3_uri(bad)


# ------------------------------------------------------------------------------------------ locks


def test_lock_excludes_other_threads_and_names_its_holder(tmp_path):
    lock = FileLock(tmp_path / ".lock", timeout=0)
    with lock:
        with lock:  # reentrant in the holding thread
            pass
        errors = []

        def other():
            try:
                FileLock(tmp_path / ".lock", timeout=0.2, what="the root").acquire()
            except StoreBusy as exc:
                errors.append(str(exc))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0] and errors[0].startswith("the root: locked by")
    with FileLock(tmp_path / ".lock", timeout=0):  # released: free again
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / ".lock"
    code = (
        "import sys, time; from raggen.storage import FileLock; FileLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreBusy, match=f"pid {proc.pid}"):
            FileLock(path, timeout=0).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with FileLock(path, timeout=5):  # the kernel dropped the dead holder's lock
            assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------------------------------------ conditional writes


def test_conditional_writes_on_a_folder(tmp_path):
    store = LocalStore(tmp_path / "root")
    etag = store.write_bytes("LATEST", b"v1\n", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.write_bytes("LATEST", b"v2\n", if_none_match=True)
    data, read_etag = store.read_with_etag("LATEST")
    assert (data, read_etag) == (b"v1\n", etag)
    new = store.write_bytes("LATEST", b"v2\n", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.write_bytes("LATEST", b"v3\n", if_match=etag)  # stale: somebody moved it since
    assert store.read_with_etag("LATEST") == (b"v2\n", new)
    assert store.list() == ["LATEST"]  # the lock file is not a stored object


def test_compare_and_swap_from_many_threads_loses_no_update(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("counter", b"0")

    def bump(times: int) -> None:
        for _ in range(times):
            while True:
                data, etag = store.read_with_etag("counter")
                try:
                    store.write_bytes("counter", str(int(data) + 1).encode(), if_match=etag)
                    break
                except PreconditionFailed:
                    continue

    threads = [threading.Thread(target=bump, args=(15,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read_bytes("counter") == b"60"


# ------------------------------------------------------------------------------------------ folders raggen owns


def test_a_folder_raggen_creates_is_marked_and_removed_whole(tmp_path):
    work = tmp_path / "new" / "work"
    info = storage.claim_folder(work, ".raggen-work", what="work_dir")
    assert info["created_dir"] is True and (work / ".raggen-work").is_file()
    (work / "sub").mkdir()
    (work / "sub" / "x.parquet").write_bytes(b"x")
    assert storage.claim_folder(work, ".raggen-work", what="work_dir")["id"] == info["id"]  # reused, same id
    assert storage.release_folder(work, ".raggen-work")
    assert not work.exists() and (tmp_path / "new").is_dir()


def test_an_empty_user_folder_is_used_then_emptied_but_kept(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    assert storage.claim_folder(mine, ".raggen-work", what="work_dir")["created_dir"] is False
    (mine / "run.json").write_text("{}")
    assert storage.release_folder(mine, ".raggen-work")
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_a_non_empty_user_folder_is_refused_and_never_deleted(tmp_path):
    home = tmp_path / "data"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(
        ConfigError, match=r"work_dir: .*data is not empty and was not created by raggen \(no \.raggen-work"
    ):
        storage.claim_folder(home, ".raggen-work", what="work_dir")
    assert not storage.release_folder(home, ".raggen-work")
    assert (home / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in home.iterdir()) == [
        "thesis.tex"
    ]


# ------------------------------------------------------------------------------------------ fingerprints


def test_content_fingerprint_follows_size_and_mtime(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.tsv").write_text("id\ttext\n1\told text\n")
    first = storage.content_fingerprint(str(corpus))
    assert [row[0] for row in first] == ["a.tsv"] and storage.content_fingerprint(str(corpus)) == first
    time.sleep(0.01)
    (corpus / "a.tsv").write_text("id\ttext\n1\tnew text\n")  # same size, new mtime
    assert storage.content_fingerprint(str(corpus)) != first
    (corpus / "b.tsv").write_text("id\ttext\n2\tb\n")
    assert [row[0] for row in storage.content_fingerprint(str(corpus))] == ["a.tsv", "b.tsv"]
    assert storage.content_fingerprint(str(corpus / "a.tsv"))[0][:2] == ["a.tsv", (corpus / "a.tsv").stat().st_size]
    assert storage.content_fingerprint(str(tmp_path / "missing")) == []
