"""Bounded memory when a version is loaded (no Ray): each FAISS index opened once and memory-mapped
from its file, the embedding column read only when asked for (never for serving; "auto": only
when the index cannot give the vectors back), the local cache keeping the newest N versions; the
merge of per-actor merges (also with their payloads, one round trip); SwappableIndex closing a swapped-out index only once no search uses it;
the search mode and encoder-pool sizing rules; the serving path's column reads without pandas."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raggen.index import manifest as M
from raggen.index import shard as S
from raggen.index.actors import actor_assignment, assign_shards, split_shards
from raggen.index.encoder_actor import encoder_pool, tokenize_task_limit
from raggen.index.hits import fill_hits, merge_hits, requests_of
from raggen.index.hot_swap import SwappableIndex
from raggen.index.loading import load_version, verify_version
from raggen.index.open_search import open_index
from raggen.index.passage_table import (
    embeddings_of,
    int64_column,
    one_chunk,
    passages_table,
    take_rows,
    write_parquet_atomic,
)
from raggen.index.publish import publish_version
from raggen.index.settings import SearchSettings, wants_actors
from raggen.index.sharded import ShardedIndex, merge_topk
from raggen.index.version_cache import CACHE_MARKER, evict_cached_versions
from tests.helpers import REPO

D = 16


def publish(
    tmp_path, factory: str = "Flat", n: int = 600, num_shards: int = 2, store_embeddings: bool = True, dim: int = D
):
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, dim)).astype(np.float32)
    out = tmp_path / "files"
    out.mkdir(exist_ok=True)
    trained = S.train_index(xb, factory=factory, train_sample=n) if not S.new_index(dim, factory).is_trained else None
    files, ids_all = [], []
    for s, rows in enumerate(np.array_split(np.arange(n), num_shards)):
        ids = (np.int64(s) << 40) + rows.astype(np.int64)
        index = S.build_shard_index(xb[rows], ids, factory=factory, trained_index=trained)
        ipath, ppath = out / f"shard-{s:05d}.faiss", out / f"shard-{s:05d}.parquet"
        S.write_index_file(index, ipath)
        table = passages_table(ids, [f"p{r}" for r in rows], [f"t{r}" for r in rows], [f"x{r}" for r in rows],
                               xb[rows] if store_embeddings else None)  # fmt: skip
        write_parquet_atomic(table, ppath)
        files.append((ipath, ppath, len(rows)))
        ids_all.append(ids)
    manifest = M.make_manifest("v1", encoder_name_or_path="x", pooling="mean", dim=dim, metric="ip",
                               faiss_factory=factory, shard_files=files)  # fmt: skip
    publish_version(str(tmp_path / "root"), manifest, out)
    return str(tmp_path / "root"), xb


def mapped_files() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


def test_each_index_is_opened_once_and_memory_mapped(tmp_path, monkeypatch):
    root, xb = publish(tmp_path, "Flat", n=2000)
    opened, deserialized = [], []
    real_open = S.open_index_file
    monkeypatch.setattr(S, "open_index_file", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(S, "deserialize_index", lambda *a, **k: deserialized.append(1) or pytest.fail("deserialized"))
    loaded = load_version(root)
    index = ShardedIndex.from_version(loaded)
    assert len(opened) == 2 and not deserialized  # one open per shard, load + wrap together
    assert loaded.shards[0].index() is loaded.shards[0].index()
    assert index._backend.searchers[0].cpu_index is loaded.shards[0].index()  # the same object, not a copy
    maps = mapped_files()
    for shard in loaded.shards:
        assert str(shard.index_path) in maps  # the file's pages are mapped, not read into the heap
    result = index.search(xb[:3], 1)
    best = np.argmax(xb[:3] @ xb.T, axis=1)  # (3,) rows; shard s holds rows [1000 s, 1000 (s + 1))
    assert result.ids == [[f"p{r}"] for r in best]


@pytest.mark.parametrize("factory,auto_reads_column", [("Flat", False), ("IVF4,Flat", False), ("IVF4,PQ4", True)])
def test_embedding_column_is_read_only_when_needed(tmp_path, factory, auto_reads_column):
    root, xb = publish(tmp_path, factory)
    serving = load_version(root, load_embeddings=False)
    assert not any(s.has_embeddings for s in serving.shards)
    auto = load_version(root, load_embeddings="auto")
    assert all(s.has_embeddings == auto_reads_column for s in auto.shards)
    assert all(s.has_embeddings for s in load_version(root).shards)  # the default keeps the old behaviour
    index = ShardedIndex.from_version(auto, nprobe=4)
    result = index.search(xb[:5], 3)
    # training gets the exact stored vectors either way: from the column, or from Flat codes
    rows = result.row_ids & ((1 << 40) - 1)  # the global row (ids carry the shard in the high bits)
    np.testing.assert_array_equal(result.embeddings, xb[rows])  # (5, 3, d)
    assert not index.search(xb[:5], 3, embeddings=False).embeddings.any()  # serving: none fetched


def test_verify_reads_no_passage_text(tmp_path, monkeypatch):
    root, _ = publish(tmp_path)
    seen = []
    real = pq.ParquetFile.read
    monkeypatch.setattr(
        pq.ParquetFile, "read", lambda self, *a, **k: seen.append(k.get("columns")) or real(self, *a, **k)
    )
    verify_version(root)
    assert seen == [["row_id"], ["row_id"]]


def test_cache_keeps_the_newest_versions_it_made(tmp_path):
    root = tmp_path / "cache" / "bucket" / "index"
    now = time.time()
    for name, age in [("v1", 4000), ("v2", 3000), ("v3", 2000), ("v4", 1000)]:
        (root / name).mkdir(parents=True)
        (root / name / CACHE_MARKER).write_text(json.dumps({"last_used": now - age}))
    (root / "foreign").mkdir()  # no marker: not raggen's
    (root / "recent").mkdir()
    (root / "recent" / CACHE_MARKER).write_text(json.dumps({"last_used": now - 1}))  # being loaded elsewhere
    evicted = evict_cached_versions(root, keep=2, keep_names={"v1"})
    assert sorted(evicted) == ["v2", "v3"]  # the newest two are recent and v4; v1 is in use here
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["foreign", "recent", "v1", "v4"]


def test_merging_per_actor_merges_equals_merging_all_shards():
    rng = np.random.default_rng(1)
    parts = []
    for s in range(5):
        scores = np.sort(rng.integers(0, 6, (4, 3)).astype(np.float32), axis=1)[:, ::-1].copy()  # many ties
        parts.append((scores, rng.integers(0, 1000, (4, 3)) + 1000 * s))
    flat = merge_topk(parts, 4)
    per_actor = []
    for shards in assign_shards(5, 2):  # [[0, 1], [2, 3], [4]]
        sc, ids, local = merge_topk([parts[s] for s in shards], 4)
        per_actor.append((sc, ids, np.where(local >= 0, np.asarray(shards)[np.maximum(local, 0)], -1)))
    two_level = merge_topk(per_actor, 4)
    for a, b in zip(flat, two_level):
        np.testing.assert_array_equal(a, b)


def test_merging_actors_hits_with_payloads_equals_search_then_fetch():
    """Each actor's top-k with its payloads (one call), merged: the same winners, ties and payloads
    as merging the bare lists and then fetching the winners; no vectors unless asked for."""
    rng = np.random.default_rng(2)
    parts = []
    for s in range(5):
        scores = np.sort(rng.integers(0, 6, (4, 3)).astype(np.float32), axis=1)[:, ::-1].copy()  # many ties
        ids = rng.choice(1000, (4, 3), replace=False) + 1000 * s
        ids[0, -1], scores[0, -1] = -1, -np.inf  # a shard with fewer hits than k
        parts.append((scores, ids))

    def fetch(requests, embeddings):  # a payload that names its shard and row
        return {s: ([f"p{s}:{r}" for r in rows], [f"t{r}" for r in rows], [f"x{r}" for r in rows],
                    np.stack([np.full(D, r, np.float32) for r in rows]).reshape(-1, D) if embeddings else None)
                for s, rows in requests.items()}  # fmt: skip

    def actor_hits(shards, embeddings):
        sc, ids, local = merge_topk([parts[s] for s in shards], 4)
        numbers = np.where(local >= 0, np.asarray(shards)[np.maximum(local, 0)], -1)
        return fill_hits(sc, ids, numbers, fetch(requests_of(ids, numbers), embeddings), embeddings=embeddings, dim=D)

    scores, ids, shards = merge_topk(parts, 4)
    want = fill_hits(scores, ids, shards, fetch(requests_of(ids, shards), True), embeddings=True, dim=D)
    got = merge_hits([actor_hits(a, True) for a in assign_shards(5, 2)], 4)
    for field in ("scores", "row_ids", "shards", "embeddings"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.ids == want.ids and got.titles == want.titles and got.texts == want.texts
    assert got.ids[1][0] == f"p{shards[1, 0]}:{ids[1, 0]}"
    bare = merge_hits([actor_hits(a, False) for a in assign_shards(5, 2)], 4)
    assert bare.embeddings is None and bare.ids == want.ids
    few = merge_hits([actor_hits([0], True)], 6)  # fewer hits than k: padded like merge_topk
    assert few.ids[0][2:] == [""] * 4 and (few.row_ids[0, 2:] == -1).all() and not few.embeddings[0, 2:].any()


class FakeIndex:
    def __init__(self, name):
        self.name, self.closed = name, 0

    def search(self, xq, k, **kw):
        return self.name

    def close(self, **kw):
        self.closed += 1


def test_swap_closes_the_old_index_only_after_its_last_search():
    live = SwappableIndex(FakeIndex("old"))
    old = live.current
    entered, release = threading.Event(), threading.Event()

    def slow_search():
        with live.use() as ix:
            entered.set()
            release.wait(5)
            assert ix is old

    t = threading.Thread(target=slow_search)
    t.start()
    entered.wait(5)
    assert live.swap(FakeIndex("new")) is old
    assert live.search(None, 1) == "new" and old.closed == 0 and live.in_flight() == 1  # still in use
    release.set()
    t.join(5)
    assert old.closed == 1 and live.drain(1.0)
    idle = live.current
    live.swap(FakeIndex("newer"))
    assert idle.closed == 1  # nobody used it: closed at once


def test_search_mode_thresholds_and_auto_opens_small_versions_locally(tmp_path):
    s = SearchSettings()
    assert s.mode == "auto" and not wants_actors(s, num_passages=10, shard_bytes=10)
    assert wants_actors(s, num_passages=1_000_000, shard_bytes=None)
    assert wants_actors(s, num_passages=10, shard_bytes=2 * 1024**3)
    assert not wants_actors(SearchSettings(mode="local"), num_passages=10**9, shard_bytes=10**12)
    assert wants_actors(SearchSettings(mode="actors"), num_passages=1, shard_bytes=1)
    root, _ = publish(tmp_path)
    index = open_index(root)  # no Ray needed: a small version is searched in this process
    assert index.backend_kind == "local" and index.actor_group is None
    with pytest.raises(RuntimeError, match="running Ray"):
        open_index(root, settings=SearchSettings(mode="auto", auto_actors_passages=100))


def test_shard_actor_layout_is_one_actor_per_node_that_fits_one_unless_configured():
    def node(cpus: float, gpus: float = 0.0, alive: bool = True) -> dict:
        return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    for shards in range(1, 12):
        for actors in range(1, 14):
            split = split_shards(shards, actors)
            assert [s for run in split for s in run] == list(range(shards))  # every shard once, in order
            assert len(split) == min(shards, actors)
            assert max(map(len, split)) - min(map(len, split)) <= 1
    assert split_shards(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert split_shards(8, 5) == [[0, 1], [2, 3], [4, 5], [6], [7]]  # five nodes: five actors
    # a 0-CPU head (KubeRay) and a dead node hold none; a node too small for the bundle neither
    nodes = [node(0), node(4), node(4), node(8, alive=False), node(0.5)]
    default = SearchSettings(mode="actors")
    assert default.shards_per_actor is None
    assert actor_assignment(8, default, nodes) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert actor_assignment(8, SearchSettings(mode="actors", actor_num_cpus=0.5), nodes) == split_shards(8, 3)
    assert actor_assignment(8, SearchSettings(mode="actors", actor_num_gpus=1), nodes) == [list(range(8))]  # none fits
    assert actor_assignment(2, default, [node(2)] * 4) == [[0], [1]]  # never more actors than shards
    assert actor_assignment(8, SearchSettings(mode="actors", shards_per_actor=2), nodes) == assign_shards(8, 2)
    assert actor_assignment(8, SearchSettings(mode="actors", shards_per_actor=1), []) == [[s] for s in range(8)]


def test_encoder_pool_is_sized_from_the_cluster():
    assert encoder_pool(None, 1.0, None, None, {"CPU": 16}) == {
        "num_actors": 14,
        "actor_num_gpus": 0.0,
        "torch_threads": 1,
    }
    assert encoder_pool(None, 4.0, None, None, {"CPU": 16}) == {
        "num_actors": 2,
        "actor_num_gpus": 0.0,
        "torch_threads": 4,
    }
    assert encoder_pool(None, 0.5, None, None, {"CPU": 1}) == {
        "num_actors": 1,
        "actor_num_gpus": 0.0,
        "torch_threads": 1,
    }
    assert encoder_pool(None, 0.5, None, None, {"CPU": 2})["num_actors"] == 1  # + a 1-CPU read task and tokenising
    assert encoder_pool(None, 4.0, None, None, {"CPU": 64, "GPU": 8})["num_actors"] == 8
    assert encoder_pool(None, 4.0, None, None, {"CPU": 64, "GPU": 8})["actor_num_gpus"] == 1.0
    assert encoder_pool(3, 2.0, 0.0, 1, {"CPU": 64, "GPU": 8}) == {
        "num_actors": 3,
        "actor_num_gpus": 0.0,
        "torch_threads": 1,
    }


def test_tokenise_tasks_are_bounded_by_cpu_encoders_and_free_for_gpus():
    assert tokenize_task_limit(1, 0.0) == 2  # a 2-CPU machine: 2 tokenise worker processes, not 4
    assert tokenize_task_limit(14, 0.0) == 15
    assert tokenize_task_limit(8, 1.0) is None  # GPUs out-encode a tokeniser core: Ray Data scales them


def test_open_index_file_maps_ivf_and_flat_and_reads_small_files(tmp_path):
    xb = np.random.default_rng(2).standard_normal((3000, D)).astype(np.float32)
    for factory in ("Flat", "IVF8,Flat", "HNSW8", "IVF8,PQ4x4,Refine(SQfp16)"):
        index = S.build_shard_index(xb, np.arange(3000), factory=factory)
        path = tmp_path / f"{factory.replace(',', '_')}.faiss"
        S.write_index_file(index, path)
        again = S.open_index_file(path)
        assert str(path) in mapped_files()
        np.testing.assert_array_equal(S.search(again, xb[:5], 4)[1], S.search(index, xb[:5], 4)[1])
        del again
    tiny = S.build_shard_index(xb[:3], np.arange(3), factory="Flat")
    S.write_index_file(tiny, tmp_path / "tiny.faiss")
    assert S.open_index_file(tmp_path / "tiny.faiss").ntotal == 3
    (tmp_path / "junk.faiss").write_bytes(b"junk" * 2000)
    with pytest.raises(RuntimeError):
        S.open_index_file(tmp_path / "junk.faiss")
    assert faiss.omp_get_max_threads() >= 1


@pytest.mark.parametrize("factory", ["IVF16,PQ8,Refine(SQfp16)", "IVF16,PQ8,RFlat"])
def test_a_loaded_reranked_index_keeps_its_refine_codes_in_the_page_cache(tmp_path, factory):
    """A published version opened as every caller and shard actor opens it (``load_version``, then
    searched): the refine stage's codes (fp16 / fp32 vectors, most of a re-ranked index's bytes) stay
    mapped from the file. A fresh process loads a small version first (imports), then two plain
    IVF-PQ versions (the first also grows the allocators' pools) and the re-ranked one of the same
    vectors: the re-ranked one costs about the anonymous memory of the second plain one, not its
    refine codes more. (FAISS's IVF-only flag, used for
    every IVF factory before, read them into memory: 935 MB per shard actor for 1 GB of
    ``IVF1024,PQ64,Refine(SQfp16)`` shards in the 2M rehearsal.)"""
    roots = {}
    n, d = 40_000, 128
    versions = (("warm", factory, 2000), ("plain", "IVF16,PQ8", n), ("plain2", "IVF16,PQ8", n), ("refined", factory, n))
    for name, f, rows in versions:
        (tmp_path / name).mkdir()
        roots[name], xb = publish(tmp_path / name, f, n=rows, num_shards=1, store_embeddings=False, dim=d)
    want = ShardedIndex.from_version(load_version(roots["refined"], load_embeddings=False), nprobe=16)
    np.save(tmp_path / "xq.npy", xb[:3])
    code = (
        "import json, sys, numpy as np\n"
        "from raggen.index.loading import load_version\n"
        "from raggen.index.sharded import ShardedIndex\n"
        "def anon():\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('RssAnon'))\n"
        "xq = np.load(sys.argv[1])\n"
        "held, growth = [], []\n"
        "for root in sys.argv[2:]:  # each kept open, so no version reuses another's freed memory\n"
        "    before = anon()\n"
        "    held.append(ShardedIndex.from_version(load_version(root, load_embeddings=False), nprobe=16))\n"
        "    ids = held[-1].search(xq, 5).ids\n"
        "    growth.append(anon() - before)\n"
        "print(json.dumps({'growth': growth, 'ids': ids}))\n"
    )
    argv = [str(tmp_path / "xq.npy"), *(roots[name] for name, _, _ in versions)]
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["ids"] == want.search(xb[:3], 5).ids
    _, _, plain, refined = out["growth"]
    refine_codes = n * d * (2 if "SQfp16" in factory else 4)  # 10 / 20 MB: read into memory, they would show
    assert refined - plain < 0.25 * refine_codes, (plain, refined, refine_codes)


def test_column_helpers_equal_pyarrow_conversions_on_chunked_and_sliced_columns():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 10**12, 50).astype(np.int64)
    emb = rng.standard_normal((50, 4)).astype(np.float32)
    whole = passages_table(ids, [f"p{i}" for i in range(50)], ["t"] * 50, [f"x{i}" for i in range(50)], emb)
    chunked = pa.concat_tables([whole.slice(3, 20), whole.slice(23, 17)])  # two chunks, both with offsets
    assert chunked.column("row_id").num_chunks == 2
    np.testing.assert_array_equal(int64_column(chunked, "row_id"), ids[3:40])
    np.testing.assert_array_equal(embeddings_of(chunked), emb[3:40])
    text = one_chunk(chunked.column("text"))
    pos = np.array([5, 0, 36, 5], dtype=np.int64)
    assert take_rows(text, pos).to_pylist() == [f"x{3 + p}" for p in pos]
    assert take_rows(one_chunk(whole.slice(10, 5).column("id")), np.array([4, 1])).to_pylist() == ["p14", "p11"]
    nulls = pa.table({"row_id": pa.array([1, None], type=pa.int64())})
    with pytest.raises(ValueError, match="null"):
        int64_column(nulls, "row_id")


def test_loading_searching_and_fetching_never_import_pandas(tmp_path):
    """A shard actor or Retriever replica loads, searches and fetches payloads with pyarrow and
    numpy only: pandas (~40 MB of RSS a process) stays out (pyarrow imports it on ``to_numpy``,
    ``pa.array`` and ``combine_chunks``)."""
    root, xb = publish(tmp_path, factory="IVF4,Flat", store_embeddings=True)
    code = f"""
import sys
import numpy as np
from raggen.index.open_search import open_index
index = open_index({root!r}, load_embeddings=True)
xq = np.load({str(tmp_path / "xq.npy")!r})
res = index.search(xq, 3)
assert res.texts[0][0].startswith("x"), res.texts[0]
assert res.embeddings.any()
print("pandas" in sys.modules)
"""
    np.save(tmp_path / "xq.npy", xb[:4])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_a_process_holding_memory_tightly_gives_freed_blocks_back():
    """``hold_memory_tightly`` (called by every shard actor): Arrow on the system allocator, and
    freed 1 MiB blocks leave the process even after a 16 MiB block was freed, which by default
    raises glibc's mmap threshold so that later blocks stay in the heap."""
    code = """
import sys
import numpy as np
import pyarrow as pa
from raggen.index.actors import hold_memory_tightly

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

tight = sys.argv[1] == "tight"
glibc = hold_memory_tightly() if tight else True
big = np.ones(16 << 20, np.uint8); del big  # freed: raises the default threshold to 16 MiB
before = anon_mb()
blocks = [np.ones(1 << 20, np.uint8) for _ in range(64)]
last = blocks.pop()  # still used: the heap cannot shrink below it
del blocks
print(pa.default_memory_pool().backend_name, glibc, round(anon_mb() - before))
"""
    out = {}
    for mode in ("tight", "default"):
        run = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert run.returncode == 0, run.stderr[-2000:]
        backend, glibc, kept = run.stdout.split()
        out[mode] = (backend, glibc == "True", int(kept))
    assert out["tight"][0] == "system" and out["default"][0] != "system"
    if not out["tight"][1]:
        pytest.skip("no glibc: the mmap threshold part does not apply")
    assert out["tight"][2] < 8 <= out["default"][2], out  # 63 MiB freed: given back vs kept


def test_a_loaded_shard_server_takes_request_blocks_from_the_heap(tmp_path):
    """Once a ShardServer has loaded its shards, a 1 MiB block allocated and freed per request (as
    FAISS's search scratch and results are) is reused from the heap, not mapped afresh and faulted
    in page by page each time, which the loading setting (``hold_memory_tightly``) alone does:
    that made every search in a shard actor ~2x slower. Counted in page faults, on a pool thread
    as the actor's methods run."""
    root, _ = publish(tmp_path, factory="IVF4,Flat")
    code = f"""
import resource, sys, threading
import numpy as np
from raggen.index.actors import ShardServer, hold_memory_tightly

if sys.argv[1] == "loading":
    hold_memory_tightly()
else:
    ShardServer({root!r}, [0, 1], cache_dir={str(tmp_path / "cache")!r})
faults = []

def requests():
    for _ in range(5):
        np.ones(1 << 20, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        np.ones(1 << 20, np.uint8)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

t = threading.Thread(target=requests)
t.start()
t.join()
print(faults[0])
"""
    faults = {}
    for mode in ("loading", "served"):
        run = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert run.returncode == 0, run.stderr[-2000:]
        faults[mode] = int(run.stdout.split()[-1])
    if faults["loading"] < 50 * 128:
        pytest.skip(f"no glibc mmap threshold here (faults {faults})")
    assert faults["served"] < 50 * 8, faults  # 256 pages per fresh 1 MiB mapping when not reused
