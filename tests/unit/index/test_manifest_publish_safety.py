"""Publishing to a local root with concurrent writers, LATEST that only moves forward, overwrite
that never touches the live version, claims left by dead publishers, verify that reads the store,
and LATEST / manifest files that are not UTF-8 (no Ray)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index import manifest as M
from raggen.index.latest import list_versions, read_latest
from raggen.index.loading import load_version, verify_version
from raggen.index.publish import publish_version, set_latest
from tests.helpers import write_random_shards

D = 8


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def build(out: Path, version: str, *, n: int = 40, seed: int = 0, created: str | None = None) -> M.Manifest:
    """Two shards of random vectors in ``out``; returns their manifest (``created`` overridable)."""
    files = write_random_shards(out, n=n, dim=D, seed=seed, store_embeddings=True, text="text {seed} {r}")
    m = M.make_manifest(version, encoder_name_or_path="e", pooling="mean", dim=D, metric="ip", faiss_factory="Flat",
                        shard_files=files)  # fmt: skip
    return m.model_copy(update={"created": created}) if created else m


# ------------------------------------------------------------------------------------------ LATEST only forward


def test_latest_never_moves_back_unless_asked(tmp_path):
    root = str(tmp_path / "root")
    new = build(tmp_path / "b2", "v2", created="2026-01-02T00:00:00.000000Z")
    old = build(tmp_path / "b1", "v1", seed=1, created="2026-01-01T00:00:00.000000Z")
    publish_version(root, new, tmp_path / "b2")
    publish_version(root, old, tmp_path / "b1")  # published, but older than what LATEST names
    assert read_latest(root) == "v2" and list_versions(root) == ["v1", "v2"]
    with pytest.raises(ConfigError, match="rollback=True"):
        set_latest(root, "v1")
    assert read_latest(root) == "v2"
    set_latest(root, "v1", rollback=True)
    assert read_latest(root) == "v1"
    set_latest(root, "v2")  # forward needs nothing
    assert read_latest(root) == "v2"
    old3 = build(tmp_path / "b3", "v3", seed=3, created="2025-12-31T00:00:00Z")  # second-resolution manifests too
    publish_version(root, old3, tmp_path / "b3", rollback=True)
    assert read_latest(root) == "v3"


def test_equal_created_times_order_by_version_name(tmp_path):
    root = str(tmp_path / "root")
    t = "2026-01-01T00:00:00.000000Z"
    publish_version(root, build(tmp_path / "b", "v-b", created=t), tmp_path / "b")
    publish_version(root, build(tmp_path / "a", "v-a", seed=1, created=t), tmp_path / "a")
    assert read_latest(root) == "v-b"


def test_move_latest_false_stages_a_version(tmp_path):
    root = str(tmp_path / "root")
    publish_version(root, build(tmp_path / "b1", "v1"), tmp_path / "b1")
    publish_version(root, build(tmp_path / "b2", "v2", seed=2), tmp_path / "b2", move_latest=False)
    assert read_latest(root) == "v1" and list_versions(root) == ["v1", "v2"]


# ------------------------------------------------------------------------------------------ overwrite


def test_overwrite_never_touches_the_live_version(tmp_path):
    root = tmp_path / "root"
    m1 = build(tmp_path / "b1", "v1")
    publish_version(str(root), m1, tmp_path / "b1")
    before = {p.name: p.read_bytes() for p in (root / "v1").iterdir()}
    with pytest.raises(ConfigError, match="'v1' is the version LATEST names"):
        publish_version(str(root), build(tmp_path / "x", "v1", seed=5), tmp_path / "x", overwrite=True)
    assert {p.name: p.read_bytes() for p in (root / "v1").iterdir()} == before
    assert verify_version(str(root)).version == "v1"


def test_overwrite_of_a_version_that_is_not_live_replaces_it_whole(tmp_path):
    root = tmp_path / "root"
    publish_version(str(root), build(tmp_path / "b1", "v1", created="2026-01-01T00:00:00Z"), tmp_path / "b1")
    publish_version(str(root), build(tmp_path / "b2", "v2", created="2026-01-02T00:00:00Z"), tmp_path / "b2")
    replacement = build(tmp_path / "r", "v1", seed=9, created="2026-01-01T00:00:00Z")
    publish_version(str(root), replacement, tmp_path / "r", overwrite=True)
    assert read_latest(str(root)) == "v2"  # LATEST stays on the newer version
    assert verify_version(str(root), "v1") == replacement
    assert load_version(str(root), "v1").shards[0].passages.column("id")[0].as_py() == "9-0"
    assert not (root / "v1" / M.CLAIM_NAME).exists()


# ------------------------------------------------------------------------------------------ concurrent writers


def _run_threads(fns):
    results: list = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_two_writers_of_one_version_name_one_wins_the_version_is_whole(tmp_path):
    root = tmp_path / "root"
    manifests = [build(tmp_path / f"w{i}", "v1", seed=i, n=4000) for i in range(2)]
    results = _run_threads([lambda i=i: publish_version(str(root), manifests[i], tmp_path / f"w{i}") for i in range(2)])
    ok = [r for r in results if isinstance(r, M.Manifest)]
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(ok) == 1 and len(errors) == 1, results
    assert isinstance(errors[0], ConfigError) and "'v1'" in str(errors[0])
    assert list_versions(str(root)) == ["v1"] and verify_version(str(root)) == ok[0]
    assert read_latest(str(root)) == "v1"
    assert sorted(p.name for p in (root / "v1").iterdir()) == sorted(["manifest.json", *(n for n, _ in ok[0].files())])


def test_concurrent_publishes_leave_latest_on_the_newest_and_never_move_it_back(tmp_path):
    root = str(tmp_path / "root")
    publish_version(root, build(tmp_path / "b0", "v0", created="2026-01-01T00:00:00Z"), tmp_path / "b0")
    manifests = [build(tmp_path / f"b{i}", f"v{i}", seed=i, created=f"2026-01-0{i + 1}T00:00:00Z") for i in range(1, 5)]
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(read_latest(root))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = _run_threads([lambda m=m: publish_version(root, m, tmp_path / f"b{m.version[1:]}")
                                for m in reversed(manifests)])  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert all(isinstance(r, M.Manifest) for r in results), results
    assert read_latest(root) == "v4" and list_versions(root) == ["v0", "v1", "v2", "v3", "v4"]
    order = [int(v[1:]) for v in seen if v]
    assert order == sorted(order), order  # every reader saw LATEST move forward only
    for v in list_versions(root):
        verify_version(root, v)


# ------------------------------------------------------------------------------------------ claims of dead publishers


def _claim(root: Path, version: str, **info) -> None:
    (root / version).mkdir(parents=True, exist_ok=True)
    (root / version / M.CLAIM_NAME).write_text(json.dumps(info))


def test_a_dead_publishers_claim_is_taken_over(tmp_path):
    import socket

    root = tmp_path / "root"
    dead = os.fork() if hasattr(os, "fork") else None
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a pid that surely is not alive any more
    _claim(root, "v1", owner="x", pid=dead, host=socket.gethostname(), started=0, updated=0)
    (root / "v1" / "shard-00000.faiss").write_bytes(b"half an upload")
    m = build(tmp_path / "b", "v1")
    publish_version(str(root), m, tmp_path / "b")
    assert verify_version(str(root)) == m and not (root / "v1" / M.CLAIM_NAME).exists()


def test_a_live_publishers_claim_is_respected(tmp_path):
    import socket
    import time

    root = tmp_path / "root"
    _claim(
        root, "v1", owner="other", pid=os.getpid(), host=socket.gethostname(), started=time.time(), updated=time.time()
    )
    with pytest.raises(ConfigError, match=r"'v1' is being published .* by pid \d+"):
        publish_version(str(root), build(tmp_path / "b", "v1"), tmp_path / "b")
    assert list_versions(str(root)) == [] and read_latest(str(root)) is None
    _claim(root, "v2", owner="far", pid=1, host="another-host", started=0, updated=time.time() - 2 * M.CLAIM_TTL_S)
    publish_version(str(root), build(tmp_path / "b2", "v2"), tmp_path / "b2")  # no heartbeat for too long: stale
    assert list_versions(str(root)) == ["v2"]


# ------------------------------------------------------------------------------------------ verify + encodings


def test_verify_reads_the_store_after_a_first_verify_passed(tmp_path):
    root = tmp_path / "root"
    publish_version(str(root), build(tmp_path / "b", "v1"), tmp_path / "b")
    assert verify_version(str(root)).version == "v1"
    shard = root / "v1" / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=r"v1/shard-00001\.parquet: sha256 mismatch"):
        verify_version(str(root))


def test_loaded_files_are_memory_mapped_not_read_whole(tmp_path):
    root = tmp_path / "root"
    publish_version(str(root), build(tmp_path / "b", "v1"), tmp_path / "b")
    loaded = load_version(str(root))
    assert isinstance(loaded.shards[0].index_bytes, np.memmap)
    assert loaded.shards[0].index().ntotal == 20


@pytest.mark.parametrize(
    "body, message",
    [
        (b"v1\xff\xfe\n", r"LATEST: not valid UTF-8 \(byte 0xff at offset 2\)"),
        (b"../../etc\n", r"LATEST: names an invalid version '\.\./\.\./etc'"),
    ],
)
def test_a_latest_that_is_not_a_version_name_is_an_integrity_error(tmp_path, body, message):
    root = tmp_path / "root"
    publish_version(str(root), build(tmp_path / "b", "v1"), tmp_path / "b")
    (root / "LATEST").write_bytes(body)
    with pytest.raises(IndexIntegrityError, match=message):
        read_latest(str(root))
    with pytest.raises(IndexIntegrityError, match=message):
        load_version(str(root))
    set_latest(str(root), "v1")  # an unreadable LATEST names nothing: it is replaced
    assert read_latest(str(root)) == "v1"


def test_a_manifest_that_is_not_utf8_is_an_integrity_error(tmp_path):
    root = tmp_path / "root"
    publish_version(str(root), build(tmp_path / "b", "v1"), tmp_path / "b")
    path = root / "v1" / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"e"', b'"\xe9"'))
    with pytest.raises(IndexIntegrityError, match=r"v1/manifest\.json: not valid UTF-8 \(byte 0xe9"):
        load_version(str(root))
    with pytest.raises(IndexIntegrityError, match=r"manifest\.json: not valid UTF-8"):
        verify_version(str(root), "v1")


def test_cli_publish_moves_latest_forward_only_unless_rollback(tmp_path, capsys):
    from raggen.cli import main

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    publish_version(src, build(tmp_path / "b1", "v1", created="2026-01-01T00:00:00Z"), tmp_path / "b1")
    publish_version(dst, build(tmp_path / "b2", "v2", seed=2, created="2026-01-02T00:00:00Z"), tmp_path / "b2")
    assert main(["index", "publish", src, dst]) == 0
    assert "LATEST stays at the newer v2" in capsys.readouterr().out and read_latest(dst) == "v2"
    assert list_versions(dst) == ["v1", "v2"] and verify_version(dst, "v1").version == "v1"
    publish_version(src, build(tmp_path / "b3", "v0", seed=3, created="2025-01-01T00:00:00Z"), tmp_path / "b3",
                    rollback=True)  # fmt: skip
    assert main(["index", "publish", src, dst, "--rollback"]) == 0
    assert "LATEST now names it" in capsys.readouterr().out and read_latest(dst) == "v0"
    assert main(["index", "publish", src, dst]) == 2  # v0 is there already: one line, no traceback
    assert "'v0' is already published" in capsys.readouterr().err
