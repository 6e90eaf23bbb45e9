"""Publish / load / verify a local index version, and exact sharded search over it (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index import manifest as M
from raggen.index import shard as S
from raggen.index.latest import list_versions, read_latest
from raggen.index.loading import load_version
from raggen.index.passage_table import passages_table, write_parquet_atomic
from raggen.index.publish import publish_version, set_latest
from raggen.index.search_params import SearchParams
from raggen.index.sharded import ShardedIndex

D = 16


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def make_version(out: Path, version: str, *, n: int = 310, num_shards: int = 3, metric: str = "ip",
                 factory: str = "Flat", store_embeddings: bool = True, seed: int = 0):  # fmt: skip
    """Random passages split into contiguous shards; returns (manifest, xb (n, d), passage ids)."""
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, D)).astype(np.float32)
    pids = np.array([f"doc-{seed}-{i}" for i in range(n)])
    files = []
    for s, rows in enumerate(np.array_split(np.arange(n), num_shards)):
        row_ids = (np.int64(s) << 40) + np.arange(len(rows), dtype=np.int64)
        index_name, passages_name = M.shard_file_names(s)
        index = S.build_shard_index(xb[rows], row_ids, factory=factory, metric=metric)
        S.write_index_file(index, out / index_name)
        table = passages_table(row_ids, pids[rows], [f"title {p}" for p in pids[rows]], [f"text of {p}" for p in pids[rows]],
                               xb[rows] if store_embeddings else None)  # fmt: skip
        write_parquet_atomic(table, out / passages_name)
        files.append((out / index_name, out / passages_name, len(rows)))
    manifest = M.make_manifest(version, encoder_name_or_path="test-encoder", pooling="mean", dim=D,
                               metric=metric, faiss_factory=factory, shard_files=files)  # fmt: skip
    return manifest, xb, pids


def publish(tmp_path: Path, root: Path, version: str, **kwargs):
    local = tmp_path / f"build-{version}"
    local.mkdir()
    manifest, xb, pids = make_version(local, version, **kwargs)
    publish_version(str(root), manifest, local)
    return manifest, xb, pids


# ------------------------------------------------------------------------------------------ publish/load


def test_publish_then_load_latest_by_version_and_by_folder(tmp_path):
    root = tmp_path / "index"
    manifest, _, _ = publish(tmp_path, root, "v1")
    assert (root / "LATEST").read_text() == "v1\n"
    assert sorted(p.name for p in (root / "v1").iterdir()) == [
        "manifest.json", "shard-00000.faiss", "shard-00000.parquet", "shard-00001.faiss",
        "shard-00001.parquet", "shard-00002.faiss", "shard-00002.parquet",
    ]  # fmt: skip
    on_disk = json.loads((root / "v1" / "manifest.json").read_text())
    assert set(on_disk) == {"version", "created", "encoder", "metric", "faiss_factory", "num_passages", "shards"}
    assert set(on_disk["encoder"]) == {
        "name_or_path",
        "pooling",
        "dim",
        "normalize",
        "passage_format",
    }  # DESIGN.md + optional fields
    assert set(on_disk["shards"][0]) == {"index", "index_sha256", "passages", "passages_sha256", "count"}
    assert [s["count"] for s in on_disk["shards"]] == [104, 103, 103] and on_disk["num_passages"] == 310
    for uri, version in ((str(root), None), (str(root), "v1"), (str(root / "v1"), None)):
        loaded = load_version(uri, version)
        assert loaded.manifest == manifest and len(loaded.shards) == 3
        assert [s.passages.num_rows for s in loaded.shards] == [104, 103, 103]
    assert list_versions(str(root)) == ["v1"] and read_latest(str(root)) == "v1"


def test_nothing_published_yet(tmp_path):
    with pytest.raises(IndexIntegrityError, match="LATEST: missing"):
        load_version(str(tmp_path))


def test_same_version_cannot_be_published_twice(tmp_path):
    root = tmp_path / "index"
    manifest, _, _ = publish(tmp_path, root, "v1")
    with pytest.raises(ConfigError, match="'v1' is already published"):
        publish_version(str(root), manifest, tmp_path / "build-v1")


def test_tampered_upload_is_refused_and_latest_stays(tmp_path):
    root = tmp_path / "index"
    publish(tmp_path, root, "v1")
    local = tmp_path / "build-v2"
    local.mkdir()
    manifest, _, _ = make_version(local, "v2", seed=1)
    with open(local / "shard-00001.parquet", "ab") as f:  # changed after the manifest was made
        f.write(b"garbage")
    with pytest.raises(IndexIntegrityError, match=r"v2/shard-00001\.parquet: sha256 .* LATEST not moved"):
        publish_version(str(root), manifest, local)
    assert read_latest(str(root)) == "v1"
    assert load_version(str(root)).version == "v1"
    with pytest.raises(IndexIntegrityError, match=r"v2/manifest\.json: missing"):
        load_version(str(root), "v2")  # the half-published folder has no manifest: never loadable
    assert list_versions(str(root)) == ["v1"]


def test_truncated_shard_is_refused_previous_version_still_loads(tmp_path):
    root = tmp_path / "index"
    publish(tmp_path, root, "v1")
    publish(tmp_path, root, "v2", seed=1)
    shard = root / "v2" / "shard-00001.faiss"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(IndexIntegrityError, match=r"v2/shard-00001\.faiss: sha256 mismatch") as err:
        load_version(str(root))
    assert "\n" not in str(err.value)
    assert load_version(str(root), "v1").version == "v1"
    with pytest.raises(ConfigError, match=r"LATEST: 'v1' is older than 'v2'.*rollback=True"):
        set_latest(str(root), "v1")  # LATEST only moves forward unless a rollback is asked for
    assert read_latest(str(root)) == "v2"
    set_latest(str(root), "v1", rollback=True)  # a rollback verifies first
    assert load_version(str(root)).version == "v1"
    with pytest.raises(IndexIntegrityError, match="shard-00001.faiss"):
        set_latest(str(root), "v2")
    assert read_latest(str(root)) == "v1"


def test_missing_shard_file_is_refused(tmp_path):
    root = tmp_path / "index"
    publish(tmp_path, root, "v1")
    (root / "v1" / "shard-00002.parquet").unlink()
    with pytest.raises(IndexIntegrityError, match=r"v1/shard-00002\.parquet: missing"):
        load_version(str(root))


def _edit_manifest(root: Path, version: str, edit) -> None:
    path = root / version / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_wrong_checksum_in_manifest_is_refused(tmp_path):
    root = tmp_path / "index"
    publish(tmp_path, root, "v1")
    _edit_manifest(root, "v1", lambda m: m["shards"][0].update(passages_sha256="0" * 64))
    with pytest.raises(IndexIntegrityError, match=r"v1/shard-00000\.parquet: sha256 mismatch"):
        load_version(str(root))


def test_counts_that_disagree_with_the_files_are_refused(tmp_path):
    root = tmp_path / "index"
    publish(tmp_path, root, "v1")  # counts 104, 103, 103: swapping keeps the total right

    def swap(m):
        m["shards"][0]["count"], m["shards"][1]["count"] = m["shards"][1]["count"], m["shards"][0]["count"]

    _edit_manifest(root, "v1", swap)
    with pytest.raises(IndexIntegrityError, match=r"shard-00000\.parquet: 104 rows, manifest count is 103"):
        load_version(str(root))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(extra_field=1), "field extra_field"),
        (lambda m: m.update(num_passages=5), "shard counts sum to 310"),
        (lambda m: m["shards"][0].update(index="../../etc/passwd"), r"field shards\.0\.index"),
        (lambda m: m["shards"][0].update(index_sha256="xyz"), r"field shards\.0\.index_sha256"),
        (lambda m: m["encoder"].pop("dim"), r"field encoder\.dim"),
        (lambda m: m.update(metric="cosine"), "field metric"),
        (lambda m: m.update(version="v9"), "field version is 'v9', expected 'v1'"),
    ],
)
def test_bad_manifest_fields_are_named(tmp_path, edit, message):
    root = tmp_path / "index"
    publish(tmp_path, root, "v1")
    _edit_manifest(root, "v1", edit)
    with pytest.raises(IndexIntegrityError, match=message):
        load_version(str(root), "v1")


def test_latest_pointing_at_a_mislabelled_folder_is_refused(tmp_path):
    root = tmp_path / "index"
    publish(tmp_path, root, "v1")
    (root / "v1").rename(root / "v2")
    (root / "LATEST").write_text("v2\n")
    with pytest.raises(IndexIntegrityError, match=r"v2/manifest\.json: field version is 'v1', expected 'v2'"):
        load_version(str(root))
    assert load_version(str(root / "v2")).version == "v1"  # a folder loaded directly is what it says


def test_manifest_that_is_not_json(tmp_path):
    root = tmp_path / "index"
    publish(tmp_path, root, "v1")
    (root / "v1" / "manifest.json").write_text("{not json")
    with pytest.raises(IndexIntegrityError, match=r"manifest\.json: not valid JSON"):
        load_version(str(root))


def test_bad_version_names_are_rejected(tmp_path):
    for bad in ("../x", "LATEST", "", "a/b"):
        with pytest.raises(ConfigError, match="version"):
            M.check_version_name(bad)
    assert M.check_version_name(M.new_version_name())


# ------------------------------------------------------------------------------------------ search


def exact_topk(xq: np.ndarray, xb: np.ndarray, k: int, metric: str):
    """One IndexFlat over ALL vectors: the reference a sharded search must reproduce."""
    flat = faiss.IndexFlatIP(xb.shape[1]) if metric == "ip" else faiss.IndexFlatL2(xb.shape[1])
    flat.add(xb)
    scores, rows = flat.search(xq, k)
    return (scores if metric == "ip" else -scores), rows


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("store_embeddings", [True, False])
def test_sharded_search_equals_one_exact_index(tmp_path, metric, store_embeddings):
    root = tmp_path / "index"
    _, xb, pids = publish(tmp_path, root, "v1", metric=metric, store_embeddings=store_embeddings, num_shards=4)
    index = ShardedIndex.from_version(load_version(str(root)), query_batch_size=3)  # 3 batches for 7 queries
    xq = np.random.default_rng(9).standard_normal((7, D)).astype(np.float32)
    result = index.search(xq, 10)
    ref_scores, ref_rows = exact_topk(xq, xb, 10, metric)
    assert result.ids == [[str(p) for p in pids[r]] for r in ref_rows]
    np.testing.assert_allclose(result.scores, ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.embeddings, xb[ref_rows])  # (b, k, d)
    assert (
        result.titles[2][0] == f"title {pids[ref_rows[2, 0]]}"
        and result.texts[2][0] == f"text of {pids[ref_rows[2, 0]]}"
    )
    assert (result.row_ids >> 40).max() <= 3 and len(np.unique(result.row_ids[0])) == 10


def test_more_k_than_passages_pads(tmp_path):
    root = tmp_path / "index"
    _, xb, _ = publish(tmp_path, root, "v1", n=5, num_shards=2)
    index = ShardedIndex.from_version(load_version(str(root)))
    result = index.search(np.ones((2, D), np.float32), 8)
    assert [row[5:] for row in result.ids] == [["", "", ""]] * 2
    assert (result.row_ids[:, 5:] == -1).all() and np.isneginf(result.scores[:, 5:]).all()
    assert sorted(result.ids[0][:5]) == sorted(f"doc-0-{i}" for i in range(5))
    with pytest.raises(ValueError, match="xq: expected dimension 16"):
        index.search(np.ones((2, D + 1), np.float32), 3)


def test_build_path_shares_one_training_and_publishes_an_exact_ivf(tmp_path):
    """build.py without Ray: encoded shard parquet -> one shared IVF training -> shard files ->
    manifest -> publish -> load; nprobe = nlist makes IVF exhaustive, so the merge is exact."""
    from raggen.index.shard_files import build_shard_files, train_shared_index
    from raggen.index.work_dir import EncodedShard

    rng = np.random.default_rng(4)
    xb = rng.standard_normal((600, D)).astype(np.float32)
    encoded = []
    for s, rows in enumerate(np.array_split(np.arange(600), 3)):
        path = tmp_path / "encoded" / f"shard-{s:05d}.parquet"
        row_ids = (np.int64(s) << 40) + np.arange(len(rows))
        write_parquet_atomic(
            passages_table(row_ids, [f"p{r}" for r in rows], [""] * len(rows), [f"t{r}" for r in rows], xb[rows]),
            path,
        )
        encoded.append(EncodedShard(shard=s, path=path, count=len(rows)))
    out = tmp_path / "out"
    out.mkdir()
    trained = train_shared_index(encoded, out, faiss_factory="IVF8,Flat", metric="ip", dim=D, train_sample=300)
    assert trained is not None and trained.ntotal == 0 and (out / "trained.faiss").is_file()
    assert train_shared_index(encoded, out, faiss_factory="Flat", metric="ip", dim=D, train_sample=300) is None
    files = [build_shard_files(e, out, faiss_factory="IVF8,Flat", metric="ip", train_sample=300, trained_index=trained,
                               store_embeddings=False) for e in encoded]  # fmt: skip
    manifest = M.make_manifest("v1", encoder_name_or_path="x", pooling="mean", dim=D, metric="ip",
                               faiss_factory="IVF8,Flat", shard_files=files)  # fmt: skip
    publish_version(str(tmp_path / "root"), manifest, out)
    loaded = load_version(str(tmp_path / "root"))
    assert not loaded.shards[0].has_embeddings
    index = ShardedIndex.from_version(loaded, nprobe=8)
    assert index._backend.coarse is not None  # one shared quantizer: queries are assigned once
    xq = rng.standard_normal((5, D)).astype(np.float32)
    _, ref_rows = exact_topk(xq, xb, 7, "ip")
    result = index.search(xq, 7)
    assert result.ids == [[f"p{r}" for r in row] for row in ref_rows]
    np.testing.assert_allclose(result.embeddings, xb[ref_rows], atol=1e-6)  # reconstructed from IVF-Flat


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ4,Refine(SQfp16)"])
def test_shared_quantizer_assignment_equals_searching_each_shard(tmp_path, factory, monkeypatch):
    """With a shared IVF quantizer and nprobe < nlist, assigning once (search_preassigned) must
    give exactly what every shard's own search gives; re-ranked shards (IDMap2 around IndexRefine)
    too, their candidates re-scored after the assigned lists' search (from a quantizer size on:
    below it, each shard searches its own)."""
    from raggen.index import shard_searcher
    from raggen.index.shard_searcher import ShardSearcher, _LocalBackend
    from raggen.index.sharded import merge_topk

    rng = np.random.default_rng(5)
    xb = rng.standard_normal((800, D)).astype(np.float32)
    trained = S.train_index(xb, factory=factory, train_sample=800)
    shards = []
    for s, rows in enumerate(np.array_split(np.arange(800), 4)):
        ids = (np.int64(s) << 40) + np.arange(len(rows))
        index = S.build_shard_index(xb[rows], ids, trained_index=trained)
        shards.append(
            (
                S.serialize_index(index),
                passages_table(ids, [f"p{r}" for r in rows], [""] * len(rows), [""] * len(rows)),
            )
        )
    searchers = [ShardSearcher(b, t, metric="ip", params=SearchParams(nprobe=3)) for b, t in shards]
    if "Refine" in factory:  # 16 x 16 floats: below the size from which re-ranked shards share
        assert _LocalBackend(searchers, max_workers=1).coarse is None
        monkeypatch.setattr(shard_searcher, "REFINE_ASSIGN_MIN_QUANTIZER_BYTES", 0)
    shared = _LocalBackend(searchers, max_workers=1)
    assert shared.coarse is not None and shared.coarse.nprobe == 3
    xq = rng.standard_normal((9, D)).astype(np.float32)
    fast = merge_topk(shared.search(xq, 6), 6)
    slow = merge_topk([s.search(xq, 6) for s in searchers], 6)
    np.testing.assert_array_equal(fast[1], slow[1])
    np.testing.assert_allclose(fast[0], slow[0], rtol=1e-6)
    # a caller's copy of the quantizer (a shard actor's caller assigns lists for every actor)
    copy = faiss.deserialize_index(faiss.serialize_index(shared.ivf.quantizer))
    for nprobe in (None, 5):
        Dq, Iq = copy.search(xq, nprobe or 3)
        given = merge_topk(shared.search(xq, 6, assignment=(Dq, Iq)), 6)
        own = merge_topk([s.search(xq, 6, params=SearchParams(nprobe=nprobe)) for s in searchers], 6)
        np.testing.assert_array_equal(given[1], own[1])
    one = _LocalBackend(searchers[:1], max_workers=1)  # one shard: nothing to save here, a caller still may
    assert one.coarse is None and one.ivf is not None and one.ivf.digest == shared.ivf.digest
    np.testing.assert_array_equal(
        one.search(xq, 6, assignment=(Dq, Iq))[0][1], searchers[0].search(xq, 6, params=SearchParams(nprobe=5))[1]
    )
    for bad in ((Dq[:2], Iq[:2]), (Dq, Iq + 16), (Dq[:, :1], Iq)):  # rows != queries, lists >= nlist, shapes
        with pytest.raises(ValueError, match="list assignment"):
            shared.search(xq, 6, assignment=bad)
    other = S.build_shard_index(xb[:200], np.arange(200), factory="IVF16,Flat", train_sample=200, seed=7)
    other_table = passages_table(np.arange(200), [f"q{r}" for r in range(200)], [""] * 200, [""] * 200)
    mixed = _LocalBackend(
        searchers[:1]
        + [ShardSearcher(S.serialize_index(other), other_table, metric="ip", params=SearchParams(nprobe=3))],
        max_workers=1,
    )
    assert mixed.coarse is None and mixed.ivf is None  # differently trained: each shard assigns its own lists
    with pytest.raises(ValueError, match="do not share one IVF quantizer"):
        mixed.search(xq, 6, assignment=(Dq, Iq))


def test_manifests_written_before_normalize_was_recorded_read_as_unnormalised():
    from raggen.index.manifest import EncoderInfo

    assert EncoderInfo.model_validate({"name_or_path": "m", "pooling": "mean", "dim": 4}).normalize is False
    assert EncoderInfo.model_validate({"name_or_path": "m", "pooling": "mean", "dim": 4, "normalize": True}).normalize


def test_a_query_encoder_that_is_the_passages_model_must_pool_as_they_were():
    info = M.EncoderInfo(name_or_path="BAAI/bge-base-en-v1.5", pooling="cls", dim=768)
    assert "cls-pooled by BAAI/bge-base-en-v1.5" in info.pooling_conflict("BAAI/bge-base-en-v1.5", "mean")
    assert info.pooling_conflict("BAAI/bge-base-en-v1.5", "cls") is None
    assert info.pooling_conflict("facebook/dpr-question_encoder-single-nq-base", "mean") is None  # another model
