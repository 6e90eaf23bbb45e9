"""Search defaults from a recall target (raggen.index.tuning): on synthetic clustered vectors the
chosen nprobe / efSearch reaches the target recall@k against brute force and the next smaller
value does not; a re-ranked IVF-PQ index gets a refine k_factor that beats FAISS's 1; the defaults
are recorded in the manifest, used when a version is opened, and overridden per call; older
manifests (no search_defaults, no refine_k_factor) stay readable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raggen.index import manifest as M
from raggen.index import shard as S
from raggen.index import tuning as T
from raggen.index.loading import load_version
from raggen.index.passage_table import passages_table, write_parquet_atomic
from raggen.index.publish import publish_version
from raggen.index.sharded import ShardedIndex

D = 16


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def clustered(n: int, d: int = D, seed: int = 0, centers: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 2
    return (c[rng.integers(0, centers, n)] + rng.standard_normal((n, d))).astype(np.float32)


def brute_force_ids(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """numpy only: the ids of the exact top-k by inner product."""
    return ids[np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def ivf_shards(xb: np.ndarray, factory: str, num_shards: int = 2):
    """Shards built from ONE trained index (as build_index does), ids with the shard in the high bits."""
    trained = S.train_index(xb, factory=factory, train_sample=len(xb))
    shards = []
    for s, rows in enumerate(np.array_split(np.arange(len(xb)), num_shards)):
        ids = (np.int64(s) << 40) + rows.astype(np.int64)
        shards.append((S.build_shard_index(xb[rows], ids, trained_index=trained), xb[rows], ids))
    return shards


def sharded_recall(shards, xq, k: int, **params) -> float:
    """recall@k of the merged shard searches at ``params`` vs brute force over all vectors."""
    from raggen.index.sharded import merge_topk

    parts = []
    for index, _, _ in shards:
        Dd, I = S.search(index, xq, k, **params)
        parts.append((Dd, I))
    _, found, _ = merge_topk(parts, k)
    xb = np.concatenate([x for _, x, _ in shards])
    ids = np.concatenate([i for _, _, i in shards])
    return recall(found, brute_force_ids(xq, xb, ids, k))


def test_chosen_nprobe_reaches_the_target_and_half_of_it_does_not():
    xb = clustered(6000)
    shards = ivf_shards(xb, "IVF64,Flat")
    xq = T.sample_queries(xb, 200, seed=1)
    defaults = T.tune([s[0] for s in shards], [s[1] for s in shards], [s[2] for s in shards], xq, metric="ip",
                      k=100, target_recall=0.99)  # fmt: skip
    nprobe = defaults.nprobe
    assert defaults.ef_search is None and defaults.max_recall == 1.0 and defaults.target_recall == 0.99
    assert 1 < nprobe < 64, f"a useful test needs a nprobe strictly between 1 and nlist, got {nprobe}"
    # checked independently: brute force in numpy over every vector
    assert sharded_recall(shards, xq, 100, nprobe=nprobe) >= 0.99
    assert sharded_recall(shards, xq, 100, nprobe=nprobe // 2) < 0.99
    assert sharded_recall(shards, xq, 100, nprobe=1) < 0.9  # FAISS's default loses a lot here
    assert defaults.recall == pytest.approx(sharded_recall(shards, xq, 100, nprobe=nprobe), abs=1e-4)


def test_a_stricter_target_never_chooses_fewer_lists():
    xb = clustered(4000, seed=3)
    shards = ivf_shards(xb, "IVF32,Flat", num_shards=3)
    xq = T.sample_queries(xb, 100, seed=2)
    args = ([s[0] for s in shards], [s[1] for s in shards], [s[2] for s in shards], xq)
    loose = T.tune(*args, metric="ip", k=50, target_recall=0.9).nprobe
    strict = T.tune(*args, metric="ip", k=50, target_recall=1.0).nprobe
    assert loose <= strict
    assert sharded_recall(shards, xq, 50, nprobe=strict) == 1.0


def test_pq_target_is_relative_to_what_exhaustive_probing_reaches():
    xb = clustered(5000, seed=4)
    shards = ivf_shards(xb, "IVF32,PQ4")
    xq = T.sample_queries(xb, 100, seed=5)
    defaults = T.tune([s[0] for s in shards], [s[1] for s in shards], [s[2] for s in shards], xq, metric="ip", k=20)
    assert defaults.max_recall < 0.99  # 4-byte codes lose recall no nprobe recovers
    assert defaults.recall >= defaults.max_recall - 0.01
    assert defaults.recall == pytest.approx(sharded_recall(shards, xq, 20, nprobe=defaults.nprobe), abs=1e-4)
    if defaults.nprobe > 1:
        assert sharded_recall(shards, xq, 20, nprobe=defaults.nprobe // 2) < defaults.max_recall - 0.01


def test_hnsw_ef_search_is_tuned_and_flat_has_nothing_to_tune():
    xb = clustered(3000, seed=6)
    ids = np.arange(3000, dtype=np.int64)
    hnsw = S.build_shard_index(xb, ids, factory="HNSW8")
    xq = T.sample_queries(xb, 100, seed=7, similarity=0.9)
    defaults = T.tune([hnsw], [xb], [ids], xq, metric="ip", k=10, target_recall=0.99)
    assert defaults.nprobe is None and defaults.ef_search >= T.MIN_EF_SEARCH
    truth = brute_force_ids(xq, xb, ids, 10)
    assert recall(S.search(hnsw, xq, 10, ef_search=defaults.ef_search)[1], truth) >= defaults.max_recall - 0.01
    if defaults.ef_search > T.MIN_EF_SEARCH:
        assert recall(S.search(hnsw, xq, 10, ef_search=defaults.ef_search // 2)[1], truth) < defaults.max_recall - 0.01
    flat = S.build_shard_index(xb, ids, factory="Flat")
    assert T.ladder(flat) is None and T.tune([flat], [xb], [ids], xq, metric="ip", k=10) is None


def test_choose_takes_the_smallest_value_within_the_margin():
    assert T.choose([1, 2, 4, 8], [0.5, 0.9, 0.992, 1.0], 0.99) == (4, 0.992, 1.0)
    assert T.choose([1, 2, 4, 8], [0.5, 0.9, 0.98, 1.0], 0.99) == (8, 1.0, 1.0)
    assert T.choose([1, 2], [0.7, 0.8], 0.99)[0] == 2  # PQ ceiling 0.8: within 1 point of it
    assert T.ladder(S.new_index(D, "IVF12,Flat"))[1] == [1, 2, 4, 8, 12]


# ------------------------------------------------------------------------------------------ manifest


def publish_ivf(tmp_path, search_defaults=None):
    xb = clustered(3000, seed=8)
    shards = ivf_shards(xb, "IVF64,Flat")
    publish_shards(tmp_path, shards, "IVF64,Flat", search_defaults)
    return xb, shards


def publish_shards(tmp_path, shards, factory: str, search_defaults=None) -> None:
    files = []
    out = tmp_path / "files"
    out.mkdir()
    for s, (index, _x, ids) in enumerate(shards):
        ipath, ppath = out / f"shard-{s:05d}.faiss", out / f"shard-{s:05d}.parquet"
        S.write_index_file(index, ipath)
        write_parquet_atomic(passages_table(ids, [f"p{i}" for i in ids], [""] * len(ids), [""] * len(ids)), ppath)
        files.append((ipath, ppath, len(ids)))
    manifest = M.make_manifest(
        "v1",
        encoder_name_or_path="x",
        pooling="mean",
        dim=D,
        metric="ip",
        faiss_factory=factory,
        shard_files=files,
        search_defaults=search_defaults,
    )
    publish_version(str(tmp_path / "root"), manifest, out)


def test_search_defaults_are_recorded_used_and_overridden_per_call(tmp_path):
    xb, shards = publish_ivf(tmp_path, search_defaults={"nprobe": 8, "recall": 0.99, "target_recall": 0.99})
    on_disk = json.loads((tmp_path / "root" / "v1" / "manifest.json").read_text())
    assert on_disk["search_defaults"] == {"nprobe": 8, "recall": 0.99, "target_recall": 0.99}
    loaded = load_version(str(tmp_path / "root"))
    assert loaded.manifest.search_defaults.nprobe == 8
    index = ShardedIndex.from_version(loaded)
    assert index.params.nprobe == 8
    xq = T.sample_queries(xb, 20, seed=9, similarity=0.7)

    def ids_at(**params):
        from raggen.index.sharded import merge_topk

        return merge_topk([S.search(ix, xq, 10, **params) for ix, _, _ in shards], 10)[1]

    np.testing.assert_array_equal(index.search(xq, 10).row_ids, ids_at(nprobe=8))  # the manifest's default
    np.testing.assert_array_equal(index.search(xq, 10, nprobe=1).row_ids, ids_at(nprobe=1))  # per call
    np.testing.assert_array_equal(index.search(xq, 10, nprobe=64).row_ids, ids_at(nprobe=64))
    assert not np.array_equal(ids_at(nprobe=1), ids_at(nprobe=64))  # the override is visible
    np.testing.assert_array_equal(index.search(xq, 10).row_ids, ids_at(nprobe=8))  # and left nothing behind
    opened = ShardedIndex.from_version(load_version(str(tmp_path / "root")), nprobe=64)  # the opener's setting wins
    np.testing.assert_array_equal(opened.search(xq, 10).row_ids, ids_at(nprobe=64))


def test_manifests_without_search_defaults_stay_readable_and_unchanged(tmp_path):
    publish_ivf(tmp_path)
    text = (tmp_path / "root" / "v1" / "manifest.json").read_text()
    assert "search_defaults" not in text  # written exactly as before
    loaded = load_version(str(tmp_path / "root"))
    assert loaded.manifest.search_defaults is None
    assert ShardedIndex.from_version(loaded).params.nprobe is None  # FAISS's own default
    data = json.loads(text)
    data["search_defaults"] = {"nprobe": 4, "ef_search": None}
    assert M.Manifest.model_validate(data).search_defaults.nprobe == 4
    assert M.Manifest.model_validate(data).search_defaults.refine_k_factor is None  # the index's own k_factor
    data["search_defaults"] = {"nprobe": 0}
    with pytest.raises(Exception, match="nprobe"):
        M.Manifest.from_json(json.dumps(data), "m.json")


def test_refine_k_factor_is_tuned_recorded_used_and_overridden_per_call(tmp_path):
    """IVF-PQ re-ranked with exact codes: FAISS's k_factor 1 re-scores only the k PQ hits; the tuned
    k_factor re-scores more candidates and reaches a higher recall@10 against brute force on
    held-out queries; the manifest records it, an opened index uses it, a per-call value overrides it."""
    factory = "IVF32,PQ4,RFlat"
    xb = clustered(4000, seed=10)
    shards = ivf_shards(xb, factory)
    xq = T.sample_queries(xb, 200, seed=11)
    defaults = T.tune([s[0] for s in shards], [s[1] for s in shards], [s[2] for s in shards], xq, metric="ip",
                      k=10, target_recall=0.99)  # fmt: skip
    nprobe, k_factor = defaults.nprobe, defaults.refine_k_factor
    assert nprobe is not None and k_factor in T.K_FACTORS and k_factor > 1, defaults
    assert defaults.recall >= defaults.max_recall - 0.01
    assert defaults.recall == pytest.approx(sharded_recall(shards, xq, 10, nprobe=nprobe, refine_k_factor=k_factor))
    held_out = T.sample_queries(xb, 100, seed=12)
    tuned = sharded_recall(shards, held_out, 10, nprobe=nprobe, refine_k_factor=k_factor)
    plain = sharded_recall(shards, held_out, 10, nprobe=nprobe, refine_k_factor=1)
    assert tuned > plain + 0.05, (tuned, plain)

    publish_shards(tmp_path, shards, factory, defaults)
    on_disk = json.loads((tmp_path / "root" / "v1" / "manifest.json").read_text())
    assert on_disk["search_defaults"]["refine_k_factor"] == k_factor and on_disk["search_defaults"]["nprobe"] == nprobe
    index = ShardedIndex.from_version(load_version(str(tmp_path / "root")))
    assert index.params.refine_k_factor == k_factor and index.params.nprobe == nprobe

    def ids_at(**params):
        from raggen.index.sharded import merge_topk

        return merge_topk([S.search(ix, held_out, 10, **params) for ix, _, _ in shards], 10)[1]

    default_ids = index.search(held_out, 10).row_ids
    np.testing.assert_array_equal(default_ids, ids_at(nprobe=nprobe, refine_k_factor=k_factor))  # the manifest's
    one = index.search(held_out, 10, refine_k_factor=1).row_ids  # per call
    np.testing.assert_array_equal(one, ids_at(nprobe=nprobe, refine_k_factor=1))
    truth = brute_force_ids(held_out, xb, np.concatenate([i for _, _, i in shards]), 10)
    assert recall(one, truth) < recall(default_ids, truth)
    np.testing.assert_array_equal(index.search(held_out, 10).row_ids, default_ids)  # and left nothing behind
    opened = ShardedIndex.from_version(load_version(str(tmp_path / "root")), refine_k_factor=1)  # the opener's wins
    np.testing.assert_array_equal(opened.search(held_out, 10).row_ids, one)


@pytest.mark.parametrize("similarity", [0.6, 0.9, 1.0])
def test_tuning_queries_sit_at_the_asked_cosine_from_their_source(similarity):
    """A tuning query is a stored vector moved to cosine ``similarity`` from it (0.6 by default: about
    where real questions are from their best passage); 1.0 keeps the stored vectors."""
    xb = np.random.default_rng(3).standard_normal((500, 384)).astype(np.float32) * 2.5
    xq = T.sample_queries(xb, 200, seed=4, similarity=similarity)
    rows = np.sort(np.random.default_rng(4).choice(500, size=200, replace=False))  # the rows it drew
    src = xb[rows]
    cos = (xq * src).sum(1) / np.linalg.norm(xq, axis=1) / np.linalg.norm(src, axis=1)
    assert abs(float(np.median(cos)) - similarity) < 0.02, float(np.median(cos))
    assert T.sample_queries(xb, 5, seed=4).shape == (5, 384)
    with pytest.raises(ValueError, match="similarity"):
        T.query_noise(0.0)
