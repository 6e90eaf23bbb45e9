"""Shard actors on a 2-node local Ray cluster (``ray.cluster_utils.Cluster``, 1 CPU per node).

- a version served by a group of shard actors (placement group SPREAD: one actor per node)
  returns exactly the single local index's top-k (ids, scores, texts, vectors), and exactly one
  IndexFlatIP's; IVF search defaults and per-call overrides hold through the actors;
- a query batch costs ONE call per actor (``search_hits``: top-k and payloads together, no
  second round trip to fetch them; ``search_packed`` for a small batch without vectors, with the
  same answer); a large batch costs two (``topk``, then ``fetch`` of the winners' payloads from the
  actors that hold them), with the same answer; ``embeddings=False`` brings back no vectors;
- a caller that opens the actor-backed index does not hold the passages: its RSS grows by much
  less than the shard's text (about 40 MB), while opening the same version locally grows by it;
- a Ray Train run with 2 workers searches through ONE actor group (counted by actor name);
- a version that does not verify fails the group's start and leaves nothing running;
  ``SwappableIndex`` moves callers to a newly started group and ends the old one;
- a shard actor killed under a caller's searches is restarted by Ray and no search fails; the
  registry of shared groups (their actors' owner) is placed on the head node.
"""

from __future__ import annotations

import os
import time

import faiss
import numpy as np
import pyarrow as pa
import pytest

from raggen.errors import IndexIntegrityError
from raggen.index import (
    SearchSettings,
    ShardActorGroup,
    ShardedIndex,
    SwappableIndex,
    load_version,
    make_manifest,
    open_index,
    passages_table,
    publish_version,
    write_parquet_atomic,
)
from raggen.index.actors import rss_bytes
from raggen.index.shard import build_shard_index, train_index, write_index_file
from tests.helpers import free_port

pytestmark = pytest.mark.integration

D = 32
N = 16_000  # passages
TEXT_CHARS = 2_500  # incompressible hex: ~40 MB of text in all


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of 1 CPU each in this process's machine; the driver joins the head."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # a dashboard port of its own: the state API (list_actors) reads it, and another test process's
    # cluster may hold Ray's default port (make test runs two processes)
    head = {"num_cpus": 1, "object_store_memory": 200 * 1024**2, "dashboard_port": free_port()}
    c = Cluster(initialize_head=True, head_node_args=head)
    c.add_node(num_cpus=1, object_store_memory=200 * 1024**2)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def write_version(
    root,
    version: str,
    xb: np.ndarray,
    texts: list[str],
    *,
    factory: str = "Flat",
    num_shards: int = 4,
    search_defaults=None,
    train_each: bool = False,
) -> None:
    """``train_each``: every shard trains its own IVF quantizer (as versions built apart would)."""
    work = root.parent / f"work-{version}"
    work.mkdir(parents=True)
    trained = train_index(xb, factory=factory, train_sample=len(xb)) if "IVF" in factory and not train_each else None
    files = []
    for s, rows in enumerate(np.array_split(np.arange(len(xb)), num_shards)):
        ids = (np.int64(s) << 40) + rows.astype(np.int64)
        index = build_shard_index(xb[rows], ids, factory=factory, trained_index=trained, train_sample=len(rows), seed=s)
        ipath, ppath = work / f"shard-{s:05d}.faiss", work / f"shard-{s:05d}.parquet"
        write_index_file(index, ipath)
        write_parquet_atomic(passages_table(ids, [f"p{r}" for r in rows], [f"title {r}" for r in rows],
                                            [texts[r] for r in rows], xb[rows]), ppath)  # fmt: skip
        files.append((ipath, ppath, len(rows)))
    manifest = make_manifest(version, encoder_name_or_path="x", pooling="mean", dim=D, metric="ip",
                             faiss_factory=factory, shard_files=files, search_defaults=search_defaults)  # fmt: skip
    publish_version(str(root), manifest, work)


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((N, D)).astype(np.float32)
    texts = [os.urandom(TEXT_CHARS // 2).hex() for _ in range(N)]
    root = tmp_path_factory.mktemp("actors") / "index"
    write_version(root, "v1", xb, texts)
    return {"root": str(root), "xb": xb, "text_bytes": sum(len(t) for t in texts)}


def settings(**kw) -> SearchSettings:
    return SearchSettings(mode="actors", actor_num_cpus=0.25, **kw)


def test_actor_group_returns_exactly_the_local_index_top_k(cluster, version):
    xb = version["xb"]
    xq = np.random.default_rng(1).standard_normal((20, D)).astype(np.float32)
    local = ShardedIndex.from_version(load_version(version["root"], load_embeddings="auto"))
    group = ShardActorGroup.start(version["root"], settings=settings(shards_per_actor=2))
    try:
        infos = group.info()
        assert [i["shards"] for i in infos] == [[0, 1], [2, 3]]
        assert len({i["node_id"] for i in infos}) == 2, "SPREAD placement: one actor per node"
        assert not any(any(i["embeddings_loaded"]) for i in infos)  # Flat: vectors come from the index
        through = group.sharded_index()
        assert through.backend_kind == "actors"
        want, got = local.search(xq, 10), through.search(xq, 10)
        assert got.ids == want.ids and got.titles == want.titles and got.texts == want.texts
        np.testing.assert_array_equal(got.row_ids, want.row_ids)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.embeddings, want.embeddings)
        small = through.search(xq[:2], 10, embeddings=False)  # 20 hits, no vectors: sent packed
        assert small.ids == want.ids[:2] and small.texts == want.texts[:2] and not small.embeddings.any()
        np.testing.assert_array_equal(small.scores, want.scores[:2])
        want_big, big = local.search(xq, 30), through.search(xq, 30)  # 600 hits: top-k, then the winners' payloads
        assert big.ids == want_big.ids and big.titles == want_big.titles and big.texts == want_big.texts
        np.testing.assert_array_equal(big.row_ids, want_big.row_ids)
        np.testing.assert_array_equal(big.scores, want_big.scores)
        np.testing.assert_array_equal(big.embeddings, want_big.embeddings)
        flat = faiss.IndexFlatIP(D)
        flat.add(xb)
        ref_scores, ref_rows = flat.search(xq, 10)
        assert got.ids == [[f"p{r}" for r in row] for row in ref_rows]
        np.testing.assert_allclose(got.scores, ref_scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.embeddings, xb[ref_rows])

        def per_query_ms(index) -> float:
            index.search(xq[:1], 10)
            t0 = time.perf_counter()
            for q in xq:
                index.search(q[None], 10)
            return 1000 * (time.perf_counter() - t0) / len(xq)

        local_ms, actors_ms = per_query_ms(local), per_query_ms(through)
        print(
            f"\nlatency per query (k=10, {N} passages, 4 shards): local {local_ms:.2f} ms, "
            f"2 shard actors on 2 nodes {actors_ms:.2f} ms"
        )
        assert sum(i["queries"] for i in group.info()) >= 2 * (2 * len(xq) + 1)
    finally:
        group.close()


def test_one_ray_call_per_actor_per_query_batch_and_no_vectors_unless_asked(cluster, version):
    """The Ray-call path (a group without direct calls, or after a failed direct call)."""
    import ray

    xb = version["xb"]
    xq = xb[:6] + 0.1 * np.random.default_rng(4).standard_normal((6, D)).astype(np.float32)
    group = ShardActorGroup.start(version["root"], settings=settings(shards_per_actor=2, direct_calls=False))
    try:
        index = group.sharded_index(query_batch_size=4)  # 6 queries: 2 batches

        def calls() -> list[dict[str, int]]:
            return [i["calls"] for i in group.info()]

        before = calls()
        result = index.search(xq, 5, embeddings=False)
        after = calls()
        for b, a in zip(before, after):  # small batches without vectors: packed (one pickle each way)
            assert a.get("search_packed", 0) - b.get("search_packed", 0) == 2, (before, after)  # one per batch
            assert a.get("search_hits", 0) == b.get("search_hits", 0) and a.get("fetch", 0) == b.get("fetch", 0)
        assert not result.embeddings.any()
        answers = ray.get([h.search_hits.remote(xq, 5, embeddings=False) for h in group.handles])
        assert all(a.embeddings is None and len(a.texts[0][0]) == TEXT_CHARS for a in answers)  # texts, no vectors
        before = calls()
        full = index.search(xq, 5)  # with vectors: Ray objects, one search_hits call per actor and batch
        assert all(a.get("search_hits", 0) - b.get("search_hits", 0) == 2 for b, a in zip(before, calls()))
        assert full.ids == result.ids and full.texts == result.texts
        np.testing.assert_array_equal(full.scores, result.scores)
        # a large batch (> ONE_ROUND_TRIP_MAX_HITS hits): each actor's top-k without payloads, then the winners'
        # payloads, one fetch call to each actor that holds some; the same answer
        before = calls()
        large = group.sharded_index(query_batch_size=6).search(xq, 50, embeddings=False)  # 300 hits
        after = calls()
        for b, a in zip(before, after):
            assert a.get("topk", 0) - b.get("topk", 0) == 1 and a.get("fetch", 0) - b.get("fetch", 0) <= 1
            assert a.get("search_hits", 0) == b.get("search_hits", 0) and a.get("search_packed", 0) == b.get(
                "search_packed", 0
            )
        assert sum(a.get("fetch", 0) - b.get("fetch", 0) for b, a in zip(before, after)) >= 1
        assert [row[:5] for row in large.ids] == result.ids and not large.embeddings.any()
        assert all(len(t) == TEXT_CHARS for row in large.texts for t in row)
        np.testing.assert_array_equal(full.embeddings, xb[[[int(i[1:]) for i in row] for row in full.ids]])
        # fetch (hits found elsewhere) still goes to the rows' actors: one call to each that holds some
        before = calls()
        again = index.fetch(full.row_ids, full.row_ids >> 40, full.scores, embeddings=True)
        assert again.ids == full.ids and again.texts == full.texts
        np.testing.assert_array_equal(again.embeddings, full.embeddings)
        assert sum(a.get("fetch", 0) - b.get("fetch", 0) for b, a in zip(before, calls())) <= len(group.handles)
    finally:
        group.close()


def test_small_requests_go_as_direct_calls_with_the_same_answer(cluster, version):
    """A small request (<= ONE_ROUND_TRIP_MAX_HITS hits) goes over the actors' own sockets: every actor's
    top-k, then the winners' payloads from the actors holding them; no Ray search call. The answer is
    the local index's, with and without vectors; a large batch still goes as Ray calls; a request that
    fails in the actor falls back to a Ray call and raises as that does."""
    xb = version["xb"]
    xq = xb[:6] + 0.1 * np.random.default_rng(5).standard_normal((6, D)).astype(np.float32)
    local = ShardedIndex.from_version(load_version(version["root"], load_embeddings="auto"))
    group = ShardActorGroup.start(version["root"], settings=settings(shards_per_actor=2))
    try:
        infos = group.info()
        assert all(i["direct_address"] is not None for i in infos) and group.direct_addresses == [
            tuple(i["direct_address"]) for i in infos
        ]
        index = group.sharded_index(query_batch_size=4)  # 6 queries x k=5: 2 small batches

        def calls() -> list[dict[str, int]]:
            return [i["calls"] for i in group.info()]

        ray_methods = ("search_hits", "search_packed", "topk", "fetch")
        before = calls()
        got, want = index.search(xq, 5, embeddings=False), local.search(xq, 5, embeddings=False)
        after = calls()
        assert got.ids == want.ids and got.titles == want.titles and got.texts == want.texts
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.row_ids, want.row_ids)
        assert not got.embeddings.any()
        for b, a in zip(before, after):
            assert a.get("direct_topk", 0) - b.get("direct_topk", 0) == 2, (before, after)  # one per batch
            assert a.get("direct_fetch", 0) - b.get("direct_fetch", 0) <= 2
            assert all(a.get(m, 0) == b.get(m, 0) for m in ray_methods), (before, after)
        # winners only: at most one fetch per actor and batch, and at least one batch fetched from each actor
        assert sum(a.get("direct_fetch", 0) - b.get("direct_fetch", 0) for b, a in zip(before, after)) >= 2
        full = index.search(xq, 5)  # with vectors, still direct
        np.testing.assert_array_equal(full.embeddings, local.search(xq, 5).embeddings)
        assert all(a.get(m, 0) == b.get(m, 0) for b, a in zip(before, calls()) for m in ray_methods)
        assert all(i["direct_connections"] >= 1 for i in group.info())  # kept open, not one per call
        before = calls()  # hits found elsewhere (BM25's): their payloads by direct calls too
        again = index.fetch(full.row_ids, full.row_ids >> 40, full.scores, embeddings=True)
        assert again.ids == full.ids and again.texts == full.texts
        np.testing.assert_array_equal(again.embeddings, full.embeddings)
        after = calls()
        assert sum(a.get("direct_fetch", 0) - b.get("direct_fetch", 0) for b, a in zip(before, after)) >= 1
        assert all(a.get(m, 0) == b.get(m, 0) for b, a in zip(before, after) for m in ray_methods)
        before = calls()
        big = group.sharded_index(query_batch_size=6).search(xq, 50, embeddings=False)  # 300 hits: Ray calls
        assert big.ids == local.search(xq, 50, embeddings=False).ids
        assert all(a.get("topk", 0) - b.get("topk", 0) == 1 for b, a in zip(before, calls()))
        with pytest.raises(ValueError):  # fails in the actor's FAISS call: the Ray call raises it as it does
            index._backend.search_hits(xq[:1, : D // 2], 5, embeddings=False)
        assert index.search(xq[:1], 5, embeddings=False).ids == want.ids[:1]  # direct calls still in use
        assert index._backend._direct_ready()
    finally:
        group.close()


def test_a_group_the_cluster_cannot_place_says_so_while_waiting_then_fails(cluster, version, caplog, monkeypatch):
    """4 CPUs per actor on nodes of 1 CPU: a warning naming what it waits for (a Serve replica otherwise
    shows only its slow start), then a clear error; no placement group left behind."""
    import logging

    from ray.util import placement_group_table

    import raggen.index.actors as actors_module

    monkeypatch.setattr(actors_module, "PLACEMENT_WARN_AFTER_S", 0.5)
    before = {p for p, t in placement_group_table().items() if t["state"] != "REMOVED"}
    with caplog.at_level(logging.WARNING, logger="raggen.index.actors"):
        with pytest.raises(RuntimeError, match="cannot place 2 actors .*actor_num_cpus"):
            ShardActorGroup.start(version["root"], settings=SearchSettings(mode="actors", shards_per_actor=2,
                                  actor_num_cpus=4), timeout_s=2.0)  # fmt: skip
    assert any("waiting up to 2 s" in r.getMessage() and "'CPU': 4.0" in r.getMessage() for r in caplog.records)
    assert {p for p, t in placement_group_table().items() if t["state"] != "REMOVED"} == before


def test_ivf_defaults_and_per_call_overrides_hold_through_actors(cluster, tmp_path):
    """The version's nprobe and a call's own give the local index's answer through the actors. Their
    caller assigns a small request's IVF lists once, with its copy of the quantizer every shard
    shares, for all actors; shards trained apart (no common quantizer) and re-ranked shards with a
    small quantizer (cheaper searched in each than re-scored outside FAISS) assign their own."""
    rng = np.random.default_rng(2)
    xb = rng.standard_normal((2000, D)).astype(np.float32)
    xq = rng.standard_normal((8, D)).astype(np.float32)
    calls = ({}, {"nprobe": 1}, {"nprobe": 16})
    cases = (("ivf", "IVF16,Flat", False, {}), ("ivf-apart", "IVF16,Flat", True, {}),
             ("ivf-refine", "IVF16,PQ8,Refine(SQfp16)", False, {"refine_k_factor": 2.0}))  # fmt: skip
    for name, factory, train_each, refine in cases:
        root = tmp_path / name / "index"
        write_version(root, "v1", xb, [f"t{i}" for i in range(2000)], factory=factory, num_shards=2,
                      search_defaults={"nprobe": 2, **refine}, train_each=train_each)  # fmt: skip
        local = ShardedIndex.from_version(load_version(str(root)))
        index = open_index(str(root), settings=settings())
        try:
            assert index.backend_kind == "actors" and index.params.nprobe == 2
            for kw in calls + (({"nprobe": 4, "refine_k_factor": 1.0}, {"refine_k_factor": 6.0}) if refine else ()):
                np.testing.assert_array_equal(index.search(xq, 5, **kw).row_ids, local.search(xq, 5, **kw).row_ids)
                one = index.search(xq[:1], 5, embeddings=False, **kw)  # small: direct calls
                np.testing.assert_array_equal(one.row_ids, local.search(xq[:1], 5, **kw).row_ids)
            assert not np.array_equal(local.search(xq, 5, nprobe=1).row_ids, local.search(xq, 5, nprobe=16).row_ids)
            ivf = index._backend.caller_quantizer()
            assigned = [i["calls"].get("caller_assigned", 0) for i in index.actor_group.info()]
            if train_each or refine:
                assert ivf is None and assigned == [0, 0]
            else:
                assert ivf is not None and ivf.nprobe == 2 and ivf.nlist == 16
                assert all(a >= 6 for a in assigned), assigned  # every direct top-k call of the 6+ searches
        finally:
            index.close()
    # a quantizer over the caller's cap (16 x 32 floats: 2048 bytes) stays in the actors
    root = str(tmp_path / "ivf" / "index")
    want = ShardedIndex.from_version(load_version(root)).search(xq[:1], 5).row_ids
    capped = open_index(root, settings=settings(caller_quantizer_max_bytes=2047))
    try:
        np.testing.assert_array_equal(capped.search(xq[:1], 5, embeddings=False).row_ids, want)
        assert capped._backend.caller_quantizer() is None
        assert [i["calls"].get("caller_assigned", 0) for i in capped.actor_group.info()] == [0, 0]
    finally:
        capped.close()


def test_caller_does_not_hold_the_passages(cluster, version):
    warm = open_index(version["root"], settings=settings(), load_embeddings=False)  # imports, first calls
    warm.search(version["xb"][:4], 5)
    warm.close()
    before = rss_bytes()
    index = open_index(version["root"], settings=settings(), load_embeddings=False)
    result = index.search(version["xb"][:4], 5)
    actors_growth = rss_bytes() - before
    holders = index.actor_group.info()
    index.close()
    assert len(result.texts[0][0]) == TEXT_CHARS
    before, arrow_before = rss_bytes(), pa.total_allocated_bytes()
    local = open_index(version["root"], settings=SearchSettings(mode="local"), load_embeddings=False)
    local.search(version["xb"][:4], 5)
    local_growth, local_arrow = rss_bytes() - before, pa.total_allocated_bytes() - arrow_before
    text = version["text_bytes"]
    print(
        f"\ncaller RSS growth: actor-backed {actors_growth / 2**20:.1f} MiB, local {local_growth / 2**20:.1f} MiB "
        f"(Arrow holds {local_arrow / 2**20:.1f} MiB more); text {text / 2**20:.1f} MiB; "
        f"shard actors' RSS {[round(h['rss_bytes'] / 2**20) for h in holders]} MiB"
    )
    assert actors_growth < 0.1 * text, "the caller must not hold the passages"
    # the local index holds them: Arrow's own count (RSS may not grow where the allocator reuses
    # pages that an earlier test's index freed, as it does in a process that ran other tests)
    assert local_arrow > 0.9 * text, "the local index holds the texts"
    local.close()


def test_a_version_that_does_not_verify_starts_no_group(cluster, version, tmp_path):
    import shutil

    from ray.util.state import list_actors

    bad = tmp_path / "bad"
    shutil.copytree(version["root"], bad)
    with open(bad / "v1" / "shard-00003.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"corrupt")
    with pytest.raises(IndexIntegrityError, match="shard-00003.parquet: sha256 mismatch"):
        ShardActorGroup.start(str(bad), settings=settings(), name="raggen-bad-group")
    alive = [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if (a.name or "").startswith("raggen-bad-group")
    ]
    assert alive == []


def test_swap_moves_callers_to_a_new_group_and_ends_the_old_one(cluster, version):
    from ray.util.state import list_actors

    live = SwappableIndex(open_index(version["root"], settings=settings()))
    old_group = live.current.actor_group
    xq = version["xb"][:3]
    first = live.search(xq, 5)
    new = open_index(version["root"], settings=settings(shards_per_actor=4))  # started + verified beside the old
    live.swap(new)
    assert live.current.actor_group.name != old_group.name and live.drain(10)
    assert live.search(xq, 5).ids == first.ids
    deadline = time.time() + 30
    while time.time() < deadline:
        states = {a.state for a in list_actors(limit=1000) if (a.name or "").startswith(old_group.name + "/")}
        if states == {"DEAD"}:
            break
        time.sleep(0.5)
    assert states == {"DEAD"}
    live.close()


def test_a_killed_shard_actor_is_restarted_and_no_search_fails(cluster, version):
    """SIGKILL one actor's process (a crash or the OOM killer) while a caller searches: Ray starts the
    actor again in its bundle, it reloads its shards, and the searches it held are sent again, so
    every search returns the exact top-k. With ``actor_max_restarts: 0`` the same kill fails searches."""
    import signal
    import threading

    import ray

    xq = np.random.default_rng(3).standard_normal((4, D)).astype(np.float32)
    want = ShardedIndex.from_version(load_version(version["root"])).search(xq, 10).ids
    group = ShardActorGroup.start(version["root"], settings=settings(shards_per_actor=2))
    try:
        index = group.sharded_index()
        fetcher = group.sharded_index()  # a caller that only fetches (BM25's hits), with connections of its own
        hits = fetcher.search(xq, 10)
        victim = group.info()[1]
        results, errors, stop = [], [], threading.Event()

        def caller():
            while not stop.is_set():
                try:
                    results.append(index.search(xq, 10).ids)
                except Exception as exc:  # noqa: BLE001 - any failed search fails the test
                    errors.append(repr(exc))

        thread = threading.Thread(target=caller)
        thread.start()
        try:
            time.sleep(0.5)
            before = len(results)
            killed_at = time.time()
            os.kill(victim["pid"], signal.SIGKILL)
            deadline = killed_at + 60
            while time.time() < deadline and ray.get(group.handles[1].info.remote())["pid"] == victim["pid"]:
                time.sleep(0.2)
            after_restart = len(results)
            print(
                f"\nshard actor back {time.time() - killed_at:.1f} s after SIGKILL; {after_restart - before} searches meanwhile"
            )
            time.sleep(0.5)
        finally:
            stop.set()
            thread.join(timeout=60)
        assert errors == [], errors[:3]
        restarted = group.info()[1]
        assert restarted["pid"] != victim["pid"], "the killed actor was started again"
        # the caller found the restarted actor's new address and went back to direct calls
        assert restarted["direct_address"] != victim["direct_address"]
        assert restarted["calls"].get("direct_topk", 0) > 0, restarted["calls"]
        # a fetch-only caller too: its first fetch finds the old address gone and goes as Ray calls,
        # then asks for the new addresses, so its next fetch is a direct call to the restarted actor
        for _ in range(2):
            got = fetcher.fetch(hits.row_ids, hits.row_ids >> 40, hits.scores)
            assert got.ids == want
        calls = group.info()[1]["calls"]
        assert calls.get("fetch", 0) > restarted["calls"].get("fetch", 0), calls
        assert calls.get("direct_fetch", 0) > restarted["calls"].get("direct_fetch", 0), calls
        assert before > 0 and len(results) > after_restart, "searches ran before the kill and after the restart"
        assert all(ids == want for ids in results)
        assert group.alive()
    finally:
        group.close()

    fragile = ShardActorGroup.start(version["root"], settings=settings(shards_per_actor=2, actor_max_restarts=0))
    try:
        os.kill(fragile.info()[0]["pid"], signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayActorError):
            for _ in range(50):  # the kill may land after a search or two
                fragile.sharded_index().search(xq, 10)
                time.sleep(0.1)
    finally:
        fragile.close()


def test_the_group_registry_lives_on_the_head_node_whoever_creates_it(cluster):
    """A Retriever replica on a worker node may be the first to ask for the registry; the registry
    (whose shard actors end with it) is placed on the head node all the same."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray.util.state import list_actors

    from raggen.index.shared_groups import REGISTRY_NAME, REGISTRY_NAMESPACE, shard_group_registry

    head = ray.get_runtime_context().get_node_id()  # the driver joined the head node
    (worker,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]

    @ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(worker, soft=False))
    def first_caller() -> str:
        registry = shard_group_registry()
        ray.get(registry.groups.remote())
        return ray.get_runtime_context().get_node_id()

    assert ray.get(first_caller.remote(), timeout=120) == worker
    (entry,) = [a for a in list_actors(filters=[("name", "=", REGISTRY_NAME), ("state", "=", "ALIVE")])]
    assert entry.node_id == head
    ray.kill(ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE))


# ------------------------------------------------------------------------------------------ training


def publish_tiny_index(passages, encoder_dir: str, root: str, work) -> None:
    from raggen.models import TextEncoder, passage_text

    enc = TextEncoder.from_pretrained(encoder_dir, max_length=64)
    xb = enc.encode([passage_text(t, x) for t, x in zip(passages["title"], passages["text"])]).numpy()  # (n, d)
    work.mkdir(parents=True)
    files = []
    for s in range(2):
        rows = np.arange(s, len(passages), 2)
        ipath, ppath = work / f"shard-{s:05d}.faiss", work / f"shard-{s:05d}.parquet"
        write_index_file(build_shard_index(xb[rows], rows.astype(np.int64)), ipath)
        sub = passages.iloc[rows]
        write_parquet_atomic(passages_table(rows, sub["id"].tolist(), sub["title"].tolist(), sub["text"].tolist(),
                                            xb[rows]), ppath)  # fmt: skip
        files.append((ipath, ppath, len(rows)))
    publish_version(root, make_manifest("v1", encoder_name_or_path=encoder_dir, pooling="mean", dim=xb.shape[1],
                                        metric="ip", faiss_factory="Flat", shard_files=files), work)  # fmt: skip


def test_train_workers_start_a_new_group_when_the_drivers_is_gone(cluster, version):
    """Every worker's set-up (``load_index``) borrows the driver's group while it answers; once its
    actors are gone for good (past their restarts) a Ray Train restart must not fail on the same dead
    group again: rank 0 starts a new group of the same version, which answers as the local index."""
    import ray

    from raggen.train.job import IndexTarget
    from raggen.train.searched_index import load_index

    xq = np.random.default_rng(7).standard_normal((6, D)).astype(np.float32)
    want = ShardedIndex.from_version(load_version(version["root"])).search(xq, 5).ids
    s = settings(shards_per_actor=2)
    group = ShardActorGroup.start(version["root"], settings=s, source_uri=version["root"])
    target = IndexTarget(uri=version["root"], search=s, group=group)
    try:
        borrowed = load_index(target)
        assert borrowed.actor_group.name == group.name and borrowed.search(xq, 5).ids == want
        borrowed.close()
        assert group.alive(timeout_s=10), "closing a worker's index leaves the driver's group up"
        for h in group.handles:
            ray.kill(h, no_restart=True)
        fresh = load_index(target)
        try:
            assert fresh.actor_group.name != group.name and fresh.version == group.version
            assert fresh.search(xq, 5).ids == want
        finally:
            fresh.close()  # rank 0 owns what it started
        assert not fresh.actor_group.alive(timeout_s=10)
    finally:
        group.close()


def test_two_train_workers_search_through_one_actor_group(cluster, tmp_path):
    from ray.util.state import list_actors

    from raggen.app.training import run_training
    from raggen.config import load_config
    from raggen.corpus import read_passages, write_qa_jsonl
    from raggen.corpus.world import WorldConfig, build_world, write_world
    from raggen.models import make_tiny_encoder, make_tiny_generator

    files = write_world(tmp_path / "world", WorldConfig(num_entities=30, seed=0))
    world = build_world(WorldConfig(num_entities=30, seed=0))
    train_file = write_qa_jsonl(tmp_path / "train.jsonl", world.train[:16])
    enc, gen = make_tiny_encoder(str(tmp_path / "enc")), make_tiny_generator(str(tmp_path / "gen"))
    publish_tiny_index(read_passages(files.passages_v1), enc, str(tmp_path / "index"), tmp_path / "index-work")

    def shard_actor_names() -> set[str]:
        return {a.name for a in list_actors(filters=[("class_name", "=", "ShardServer")], limit=1000) if a.name}

    before = shard_actor_names()
    cfg = load_config(None, [
        "train.name=actors", f"train.storage_path={tmp_path / 'runs'}", f"train.train_file={train_file}",
        f"train.index={tmp_path / 'index'}", "train.estimator=rag-sequence", "train.steps=2", "train.batch_size=2",
        "train.top_k=2", "train.num_workers=2", "train.cpus_per_worker=0.25", "train.checkpoint_every=2",
        "train.use_gpu=false", f"model.query_encoder.name_or_path={enc}", "model.query_encoder.max_length=32",
        f"model.generator={gen}", "model.max_source_length=64", "model.max_target_length=8",
        "index.search.mode=actors", "index.search.actor_num_cpus=0.25",
    ])  # fmt: skip
    summary = run_training(cfg)
    group = summary["index_group"]
    assert group is not None and group["actors"] == 2 and group["nodes"] == 2
    # 2 workers x 2 steps x 2 examples: every search went through the group's actors
    assert all(q >= 2 * 2 * 2 for q in group["queries"]), group
    new = shard_actor_names() - before
    assert {n.rsplit("/", 1)[0] for n in new} == {group["name"]}, f"one group for both workers, got {sorted(new)}"
    assert len(new) == 2


# ------------------------------------------------------------------------------------------ building


def test_quantizer_training_and_shards_are_built_in_ray_tasks_with_tuned_defaults(cluster, tmp_path):
    """build_index's FAISS stage: training and the 3 shards run as Ray tasks (pinned to the
    driver's node, whose work dir holds the files); the search defaults they measure are what
    tuning all shards in one process gives."""
    import ray
    from ray.util.state import list_tasks

    from raggen.index import embeddings_of
    from raggen.index import tuning as T
    from raggen.index.shard import read_index_file
    from raggen.index.shard_files import build_shards_in_tasks
    from raggen.index.work_dir import EncodedShard

    rng = np.random.default_rng(3)
    centers = rng.standard_normal((30, D)).astype(np.float32) * 2
    xb = (centers[rng.integers(0, 30, 3000)] + rng.standard_normal((3000, D))).astype(np.float32)
    encoded = []
    for s, rows in enumerate(np.array_split(np.arange(3000), 3)):
        path = tmp_path / "encoded" / f"shard-{s:05d}.parquet"
        ids = (np.int64(s) << 40) + rows.astype(np.int64)
        write_parquet_atomic(
            passages_table(ids, [f"p{r}" for r in rows], [""] * len(rows), [""] * len(rows), xb[rows]), path
        )
        encoded.append(EncodedShard(shard=s, path=path, count=len(rows)))
    out = tmp_path / "out"
    out.mkdir()
    files, defaults = build_shards_in_tasks(encoded, out, faiss_factory="IVF32,Flat", metric="ip", dim=D, train_sample=3000,
                                            store_embeddings=False, target_recall=0.99, tune_queries=100, tune_k=20,
                                            num_cpus=0.25, work_dir_shared=False)  # fmt: skip
    assert [f[2] for f in files] == [1000, 1000, 1000] and all(f[0].is_file() and f[1].is_file() for f in files)
    indexes = [read_index_file(f[0]) for f in files]
    xq = T.sample_queries(xb[:1000], 100, seed=0)  # what the task sampled: the largest shard (the first of equals)
    here = T.tune(indexes, [xb[:1000], xb[1000:2000], xb[2000:]], [np.asarray(p.column("row_id")) for p in
                  (load_passages(f[1]) for f in files)], xq, metric="ip", k=20, target_recall=0.99)  # fmt: skip
    assert defaults is not None and defaults.nprobe == here.nprobe and defaults.recall == here.recall
    assert 1 <= defaults.nprobe <= 32 and defaults.num_queries == 100
    driver_node = ray.get_runtime_context().get_node_id()
    deadline = time.time() + 30
    while time.time() < deadline:  # task events reach the state API asynchronously
        tasks = [t for t in list_tasks(filters=[("func_or_class_name", "=", "build_and_measure_shard")], limit=1000,
                                       detail=True) if t.state == "FINISHED"]  # fmt: skip
        if len(tasks) >= 3:
            break
        time.sleep(0.5)
    assert len(tasks) == 3 and {t.node_id for t in tasks} == {driver_node}
    assert embeddings_of(load_passages(files[0][1])) is None  # store_embeddings=False


def load_passages(path):
    import pyarrow.parquet as pq

    return pq.read_table(path)
