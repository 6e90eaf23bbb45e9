"""Passages mapped from the cache (what shard actors serve from): texts as compressed blocks and
stored vectors as a ``.npy``, the same rows as the parquet, made into the cache and checked on every
open; a process that loads a shard this way holds only the blocks it read, not the decoded column."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raggen.errors import IndexIntegrityError, RaggenError
from raggen.index.loading import load_version
from raggen.index.passage_blocks import PassageBlocks, write_passage_blocks
from raggen.index.passage_cache import open_blocks, open_vectors
from raggen.index.passage_vectors import PassageVectors, open_passage_vectors
from raggen.index.sharded import ShardedIndex
from raggen.storage import sha256_file
from tests.helpers import REPO
from tests.unit.index.test_sharded_memory import publish


def odd_table(n: int) -> pa.Table:
    rng = np.random.default_rng(5)
    texts = [("é→ " * int(rng.integers(0, 5))) + f"text {i}" if i % 7 else "" for i in range(n)]  # '' and UTF-8
    titles = [None if i % 11 == 0 else f"title {i}" for i in range(n)]
    return pa.table({"row_id": pa.array(np.arange(n) * 3, pa.int64()), "id": [f"p{i}" for i in range(n)],
                     "title": pa.array(titles, pa.string()), "text": texts})  # fmt: skip


def test_blocks_give_back_every_row_across_row_groups_and_batches(tmp_path):
    table = odd_table(1000)
    path = tmp_path / "p.parquet"
    pq.write_table(table, path, row_group_size=37)  # batches end at row-group ends, not block multiples
    sha = sha256_file(path)
    out = tmp_path / "p.blocks"
    assert write_passage_blocks(path, out, source_sha256=sha, rows_per_block=16, batch_rows=50) == 1000
    blocks = PassageBlocks(out, source_sha256=sha, rows=1000)
    pos = np.random.default_rng(0).integers(0, 1000, 300)
    ids, titles, texts = blocks.take(pos)
    assert ids == table.column("id").take(pos).to_pylist()
    assert titles == [t or "" for t in table.column("title").take(pos).to_pylist()]  # a null title reads ''
    assert texts == table.column("text").take(pos).to_pylist()
    assert blocks.take(np.array([], np.int64)) == ([], [], [])
    with pytest.raises(IndexError):
        blocks.take(np.array([1000]))


def _mapped_resident_kb(path: Path) -> int | None:
    """Resident KB of this process's mappings of ``path`` (/proc/self/smaps); None: not mapped."""
    total, current = None, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = line.rstrip("\n").split(None, 5)[5:] == [str(path)]
                if current and total is None:
                    total = 0
            elif current and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_reading_blocks_maps_none_of_the_file_and_leaves_no_descriptor_open(tmp_path):
    """Blocks are read with pread: a mapped file faulted the pages around each random read into the
    reader's RSS (44 MB of a 78 MB file after 200 single queries), a page-cache copy it need not own."""
    path = tmp_path / "p.parquet"
    pq.write_table(odd_table(5000), path)
    sha = sha256_file(path)
    out = tmp_path / "p.blocks"
    write_passage_blocks(path, out, source_sha256=sha)
    blocks = PassageBlocks(out, source_sha256=sha, rows=5000)
    texts = blocks.take(np.random.default_rng(1).integers(0, 5000, 2000))[2]
    assert len(texts) == 2000
    assert _mapped_resident_kb(out) is None, "the blocks file is mapped into the reader"
    fd = blocks._file.fd
    assert Path(f"/proc/self/fd/{fd}").resolve() == out.resolve()
    blocks.close()
    assert not Path(f"/proc/self/fd/{fd}").exists() or Path(f"/proc/self/fd/{fd}").resolve() != out.resolve()
    blocks.close()  # twice: nothing to close
    copy = pickle.loads(pickle.dumps(PassageBlocks(out, source_sha256=sha, rows=5000)))  # opens its own
    assert copy.take(np.array([7, 4999]))[2] == blocks_texts(path, [7, 4999])


def blocks_texts(parquet: Path, rows: list[int]) -> list[str]:
    return pq.read_table(parquet, columns=["text"]).column("text").take(rows).to_pylist()


def test_a_damaged_or_foreign_blocks_file_is_refused_and_made_again(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(odd_table(200), path)
    sha = sha256_file(path)
    made = open_blocks(path, sha, 200, tmp_path / "cache")
    data = bytearray(made.path.read_bytes())
    data[40] ^= 0xFF  # a flipped bit inside a block
    made.path.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="sha256 mismatch"):
        PassageBlocks(made.path, source_sha256=sha, rows=200)
    write_passage_blocks(path, tmp_path / "other.blocks", source_sha256="0" * 64)
    with pytest.raises(IndexIntegrityError, match="made from another file"):
        PassageBlocks(tmp_path / "other.blocks", source_sha256=sha, rows=200)
    again = open_blocks(path, sha, 200, tmp_path / "cache")  # rebuilt in place, atomically
    assert again.path == made.path and again.take(np.array([199]))[0] == ["p199"]
    (tmp_path / "full").write_text("a file where the cache folder should be")
    with pytest.raises(RaggenError, match=r"could not make p\.parquet\..*\.blocks in .*full"):
        open_blocks(path, sha, 200, tmp_path / "full")  # the child's error, named; nothing half-written


@pytest.mark.parametrize("factory,stored", [("IVF4,Flat", False), ("IVF4,PQ4", True)])
def test_a_mapped_version_searches_like_the_table_and_keeps_the_users_folder(tmp_path, factory, stored):
    """IVF4,Flat: texts from blocks, vectors from the Flat codes; IVF4,PQ4 with stored embeddings
    ("auto" wants them): the vectors from the mapped .npy, equal to the stored column."""
    root, xb = publish(tmp_path, factory, store_embeddings=stored)
    before = sorted(p.name for p in (tmp_path / "root").rglob("*"))
    cache = tmp_path / "raggen-cache"
    table = ShardedIndex.from_version(load_version(root, load_embeddings="auto"), nprobe=4)
    loaded = load_version(root, load_embeddings="auto", passage_store="mapped", cache_dir=cache)
    assert all(s.texts is not None and s.passages.column_names == ["row_id"] for s in loaded.shards)
    assert all((s.vectors is not None) == stored == s.has_embeddings for s in loaded.shards)
    if stored:
        assert isinstance(loaded.shards[0].vectors, PassageVectors)  # read on demand, never a decoded column
    mapped = ShardedIndex.from_version(loaded, nprobe=4)
    a, b = table.search(xb[:6], 5), mapped.search(xb[:6], 5)
    assert a.ids == b.ids and a.titles == b.titles and a.texts == b.texts and a.texts[0][0].startswith("x")
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    if stored:  # the stored vectors themselves, not PQ's approximation
        np.testing.assert_array_equal(b.embeddings, xb[b.row_ids & ((1 << 40) - 1)])
    assert sorted(p.name for p in (tmp_path / "root").rglob("*")) == before  # nothing written there
    assert len(list(cache.rglob("*.blocks"))) == 2 and len(list(cache.rglob("*.vectors.npy"))) == (2 if stored else 0)
    with pytest.raises(ValueError, match="passage_store"):
        load_version(root, passage_store="mmap")


def test_damaged_or_foreign_stored_vectors_are_refused_and_made_again(tmp_path):
    root, xb = publish(tmp_path, "Flat", store_embeddings=True)
    parquet = tmp_path / "root" / "v1" / "shard-00000.parquet"
    sha = sha256_file(parquet)
    vectors = open_vectors(parquet, sha, 300, tmp_path / "cache")
    np.testing.assert_array_equal(vectors, xb[:300])
    np.testing.assert_array_equal(vectors[np.array([299, 0, 7])], xb[[299, 0, 7]])
    assert _mapped_resident_kb(vectors.path) is None  # read with pread: nothing of the file mapped
    copy = pickle.loads(pickle.dumps(vectors))  # opens its own descriptor
    np.testing.assert_array_equal(copy[np.array([5])], xb[[5]])
    with pytest.raises(IndexError):
        vectors[np.array([300])]
    path = vectors.path
    del vectors, copy
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="sha256 mismatch"):
        open_passage_vectors(path, source_sha256=sha, rows=300)
    with pytest.raises(IndexIntegrityError, match="made from another file"):
        open_passage_vectors(path, source_sha256="0" * 64, rows=300)
    np.testing.assert_array_equal(open_vectors(parquet, sha, 300, tmp_path / "cache"), xb[:300])


def test_a_process_serving_texts_from_blocks_does_not_hold_the_text_column(tmp_path):
    """Anonymous memory after loading a shard of ~45 MB of text and fetching 200 passages: the
    decoded column with "table", a small part of it with "blocks"."""
    rng = np.random.default_rng(7)
    words = np.array([f"w{i}" for i in range(5000)])
    n = 40_000
    texts = [" ".join(rng.choice(words, 200)) for _ in range(n)]  # ~1.2 KB each
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"row_id": pa.array(np.arange(n), pa.int64()), "id": [str(i) for i in range(n)],
                             "title": [""] * n, "text": texts}), path)  # fmt: skip
    text_mb = sum(map(len, texts)) / 2**20
    code = f"""
import sys
import numpy as np
import pyarrow.parquet as pq
from raggen.index.actors import hold_memory_tightly
from raggen.index.passage_cache import open_blocks
from raggen.index.passage_table import one_chunk, take_rows
from raggen.storage import sha256_file
from pathlib import Path

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

hold_memory_tightly()
path = Path({str(path)!r})
sha = sha256_file(path)
pos = np.random.default_rng(0).integers(0, {n}, 200)
if sys.argv[1] == "blocks":
    open_blocks(path, sha, {n}, path.parent / "cache")  # made once (as by the node's first actor)
before = anon_mb()
if sys.argv[1] == "blocks":
    got = open_blocks(path, sha, {n}, path.parent / "cache").take(pos)[2]
else:
    with pq.ParquetFile(path, memory_map=True) as pf:
        text = one_chunk(pf.read(columns=["text"], use_threads=False).column("text"))
    got = take_rows(text, pos).to_pylist()
print(round(anon_mb() - before, 1), len(got[0]))
"""
    grown = {}
    for mode in ("table", "blocks"):
        run = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert run.returncode == 0, run.stderr[-2000:]
        mb, length = run.stdout.split()
        assert int(length) > 1000
        grown[mode] = float(mb)
    assert grown["table"] > 0.8 * text_mb, grown  # the decoded column lives in the process
    assert grown["blocks"] < 0.15 * text_mb, grown  # the blocks read, their rows, the codec (~3 MB in all)


def test_a_shard_server_answers_the_same_from_either_passage_store(tmp_path):
    """``index.search.actor_passages``: a shard actor's class, built in this process (no Ray), gives
    the same hits, texts and stored vectors from mapped files as from the decoded table."""
    from raggen.index.actors import ShardServer
    from raggen.index.search_params import SearchParams

    root, xb = publish(tmp_path, "IVF4,PQ4", store_embeddings=True)
    servers = {
        store: ShardServer(
            root, [0, 1], cache_dir=str(tmp_path / "cache"), params=SearchParams(nprobe=4), passage_store=store
        )
        for store in ("mapped", "table")
    }
    assert servers["mapped"].embeddings_loaded == [True, True]  # PQ codes: "auto" wants the stored vectors
    got = {store: s.search_hits(xb[:5], 4) for store, s in servers.items()}
    a, b = got["mapped"], got["table"]
    assert a.ids == b.ids and a.texts == b.texts and a.titles == b.titles
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.embeddings, xb[a.row_ids & ((1 << 40) - 1)])  # stored, not PQ's
    for s in servers.values():
        s.backend.close()


def test_local_mode_can_map_the_passages_too(tmp_path):
    """``index.search.local_passages: mapped``: a caller searching in its own process (Train worker,
    Serve replica) maps the same cache files, and answers as with the decoded table."""
    from raggen.index.open_search import open_index
    from raggen.index.settings import SearchSettings

    root, xb = publish(tmp_path, "IVF4,PQ4", store_embeddings=True)
    table = open_index(root, settings=SearchSettings(mode="local"), cache_dir=tmp_path / "cache")
    mapped = open_index(
        root, settings=SearchSettings(mode="local", local_passages="mapped"), cache_dir=tmp_path / "cache"
    )
    assert all(s._texts is not None and isinstance(s._emb, PassageVectors) for s in mapped._backend.searchers)
    assert all(s._texts is None for s in table._backend.searchers)
    a, b = table.search(xb[:5], 4), mapped.search(xb[:5], 4)
    assert a.ids == b.ids and a.texts == b.texts
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_blocks_are_read_from_many_threads_at_once(tmp_path):
    """A shard actor serves several requests at once (``actor_max_concurrency``): concurrent takes
    give the same rows as one thread does."""
    from concurrent.futures import ThreadPoolExecutor

    table = odd_table(3000)
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    sha = sha256_file(path)
    blocks = open_blocks(path, sha, 3000, tmp_path / "cache")
    draws = [np.random.default_rng(s).integers(0, 3000, 400) for s in range(16)]
    want = [blocks.take(pos) for pos in draws]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(blocks.take, draws))
    assert got == want
    assert got[3][2] == table.column("text").take(draws[3]).to_pylist()
