"""raggen.storage's one atomic-write helper: temporary name in the same folder, fsync, os.replace,
cleanup on failure, the umask's mode (not mkstemp's 0600), unique temporary names per writer, and
the atomic folder swap; the writers built on it (readers, parquet, world files) inherit all of it."""

from __future__ import annotations

import gzip
import os
import stat
import threading

import pandas as pd
import pytest

from raggen import storage
from raggen.storage import AtomicFile, atomic_copy_file, atomic_directory, atomic_write_bytes, atomic_writer


@pytest.fixture()
def umask():
    """Set the process umask for one test (and put the old one back)."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(value: int) -> None:
        os.umask(value)

    yield set_
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_published_files_get_the_umask_mode_not_0600(tmp_path, umask, mask, expected):
    from raggen.corpus.readers import write_passages
    from raggen.index.passage_table import passages_table, write_parquet_atomic

    umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with atomic_writer(tmp_path / "b.txt") as f:
        f.write("text")
    atomic_copy_file(tmp_path / "a.bin", tmp_path / "c.bin")
    write_passages(tmp_path / "p.tsv", pd.DataFrame({"id": ["1"], "text": ["t"], "title": [""]}))
    write_passages(tmp_path / "p.jsonl", pd.DataFrame({"id": ["1"], "text": ["t"], "title": [""]}))
    write_parquet_atomic(passages_table([0], ["1"], [""], ["t"]), tmp_path / "p.parquet")
    for name in ("a.bin", "b.txt", "c.bin", "p.tsv", "p.jsonl", "p.parquet"):
        assert mode(tmp_path / name) == expected, name


def test_commit_replaces_in_one_step_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "LATEST"
    atomic_write_bytes(target, b"v1\n")
    inode = target.stat().st_ino
    writer = AtomicFile(target, "wb")
    writer.file.write(b"v2\n")
    assert target.read_bytes() == b"v1\n"  # readers see the old file until the commit
    assert writer.tmp_path.parent == target.parent and writer.tmp_path.name.startswith(".LATEST.tmp-")
    writer.commit()
    assert target.read_bytes() == b"v2\n" and target.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "data.txt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_writer(target) as f:
            f.write("half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]
    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_concurrent_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    target = tmp_path / "shard-00000.parquet"
    writers = [AtomicFile(target, "wb") for _ in range(8)]
    assert len({w.tmp_path for w in writers}) == 8
    assert all(str(os.getpid()) in w.tmp_path.name for w in writers)
    for i, w in enumerate(writers):
        w.file.write(f"writer {i}".encode())
    for w in writers:
        w.commit()
    assert target.read_bytes() == b"writer 7"  # each commit is whole: the last one wins
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_threads_writing_one_file_each_publish_a_whole_version(tmp_path):
    target = tmp_path / "f.bin"
    payloads = [bytes([i]) * 200_000 for i in range(6)]

    def write(data: bytes) -> None:
        for _ in range(5):
            atomic_write_bytes(target, data)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_gz_paths_are_compressed_text_is_utf8(tmp_path):
    with atomic_writer(tmp_path / "t.jsonl.gz") as f:
        f.write('{"text": "Zürich"}\n')
    assert gzip.decompress((tmp_path / "t.jsonl.gz").read_bytes()).decode() == '{"text": "Zürich"}\n'
    with atomic_writer(tmp_path / "t.bin", "wb") as f:
        f.write(b"\x00\xff")
    assert (tmp_path / "t.bin").read_bytes() == b"\x00\xff"


def test_copy_hashes_what_it_copied(tmp_path):
    data = os.urandom(storage.CHUNK + 123)
    (tmp_path / "src").write_bytes(data)
    assert atomic_copy_file(tmp_path / "src", tmp_path / "sub" / "dst") == storage.sha256_bytes(data)
    assert (tmp_path / "sub" / "dst").read_bytes() == data


def test_directory_swap_is_all_or_nothing(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    with atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]  # replaced as a whole
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half").write_bytes(b"h")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folder left


def test_storage_is_the_one_atomic_writer_the_corpus_uses():
    from raggen.corpus import readers

    assert readers.atomic_writer is storage.atomic_writer
