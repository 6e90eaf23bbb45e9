"""The BM25 sparse index of a version: built beside the shards, in the manifest with sha256,
verified before use, removed with its version; dense / sparse / hybrid search over it (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index import lifecycle as L
from raggen.index import manifest as M
from raggen.index import shard as S
from raggen.index.latest import read_latest
from raggen.index.loading import read_manifest, verify_version
from raggen.index.open_search import open_index
from raggen.index.passage_table import passages_table, write_parquet_atomic
from raggen.index.publish import publish_version
from raggen.index.shard_files import build_sparse_files, check_sparse_kind
from raggen.index.sparse import SparseIndex, load_sparse
from raggen.retrieval import RetrievalSettings, rrf_fuse, weighted_fuse, with_retrieval

D = 8
WORDS = ["river", "mountain", "castle", "harbour", "violin", "comet", "orchard", "glacier", "lantern", "canyon"]


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def texts_of(n: int) -> list[str]:
    return [f"the {WORDS[i % 10]} near item{i} is {WORDS[(i * 3) % 10]} coloured" for i in range(n)]


def publish(root: str, tmp: Path, version: str, *, n: int = 40, sparse: bool = True) -> M.Manifest:
    out = tmp / f"b-{version}"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, D)).astype(np.float32)
    texts = texts_of(n)
    files = []
    for s, rows in enumerate(np.array_split(np.arange(n), 2)):
        ids = (np.int64(s) << 40) + np.arange(len(rows), dtype=np.int64)
        index_name, passages_name = M.shard_file_names(s)
        S.write_index_file(S.build_shard_index(xb[rows], ids), out / index_name)
        write_parquet_atomic(
            passages_table(ids, [f"p{r}" for r in rows], [f"T{r}" for r in rows], [texts[r] for r in rows]),
            out / passages_name,
        )
        files.append((out / index_name, out / passages_name, len(rows)))
    sparse_files, params = build_sparse_files(files, out) if sparse else (None, None)
    m = M.make_manifest(
        version,
        encoder_name_or_path="e",
        pooling="mean",
        dim=D,
        metric="ip",
        faiss_factory="Flat",
        shard_files=files,
        sparse_files=sparse_files,
        sparse_params=params,
    )
    return publish_version(root, m, out)


def test_the_sparse_files_are_files_of_the_version(tmp_path):
    root = str(tmp_path / "root")
    m = publish(root, tmp_path, "v1")
    assert m.sparse is not None and m.sparse.count == 40 and m.sparse.params["k1"] == 1.5
    names = [f.name for f in m.sparse.files]
    assert "bm25-row-ids.npy" in names and all(n.startswith("bm25-") for n in names)
    assert set(names) <= {n for n, _ in m.files()}
    assert all(Path(root, "v1", n).is_file() for n in names)
    again = read_manifest(root)  # round trip through manifest.json
    assert again.sparse == m.sparse
    verify_version(root)
    # a manifest without the field reads as before (and writes no "sparse" key)
    plain = publish(root, tmp_path, "v0", sparse=False)
    assert plain.sparse is None and '"sparse"' not in plain.to_json()
    assert load_sparse(root, "v0") is None


def test_a_corrupt_sparse_file_is_refused(tmp_path):
    root = str(tmp_path / "root")
    publish(root, tmp_path, "v1")
    f = Path(root, "v1", "bm25-vocab.json")
    f.write_bytes(f.read_bytes().replace(b"river", b"rivet"))
    with pytest.raises(IndexIntegrityError, match="bm25-vocab.json: sha256 mismatch"):
        verify_version(root, "v1")
    with pytest.raises(IndexIntegrityError, match="bm25-vocab.json: sha256 mismatch"):
        load_sparse(root, "v1")
    Path(root, "v1", "bm25-row-ids.npy").unlink()
    with pytest.raises(IndexIntegrityError):
        L.set_latest_version(root, "v1")


def test_rm_removes_the_sparse_files_too(tmp_path):
    root = str(tmp_path / "root")
    publish(root, tmp_path, "v1")
    m2 = publish(root, tmp_path, "v2")
    assert read_latest(root) == "v2"
    removed = L.remove_version(root, "v1")
    assert set(removed) == {"manifest.json", *(n for n, _ in m2.files())}
    assert not Path(root, "v1").exists()


def test_sparse_search_finds_the_words(tmp_path):
    root = str(tmp_path / "root")
    publish(root, tmp_path, "v1")
    sparse = load_sparse(root)
    assert isinstance(sparse, SparseIndex) and sparse.num_docs == 40
    scores, rows = sparse.search(["item17 please", "zzz nothing matches"], 3)
    assert rows[0, 0] == 17 and scores[0, 0] > 0  # p17: shard 0, position 17
    assert sparse.search(["item33"], 1)[1][0, 0] == (np.int64(1) << 40) + 13  # p33: shard 1, position 13
    assert (rows[1] == -1).all() and np.isneginf(scores[1]).all()
    with pytest.raises(ConfigError, match="index.sparse"):
        check_sparse_kind("splade")


def test_dense_sparse_and_hybrid_modes(tmp_path):
    root = str(tmp_path / "root")
    publish(root, tmp_path, "v1")
    publish(root, tmp_path, "v0", sparse=False)
    xq = np.random.default_rng(1).standard_normal((2, D)).astype(np.float32)
    questions = ["where is item3", "glacier lantern"]
    dense_index = open_index(root, "v1", load_embeddings=False)
    index = with_retrieval(dense_index, root, RetrievalSettings(mode="hybrid", fusion="rrf", candidates=10))
    dense = index.search(xq, 5, questions=questions, mode="dense")
    np.testing.assert_array_equal(dense.row_ids, dense_index.search(xq, 5, embeddings=False).row_ids)
    sparse = index.search(xq, 5, questions=questions, mode="sparse")
    assert sparse.ids[0][0] == "p3" and "item3" in sparse.texts[0][0] and sparse.titles[0][0] == "T3"
    hybrid = index.search(xq, 5, questions=questions)  # the settings' mode
    d10 = dense_index.search(xq, 10, embeddings=False)
    _, s10 = index.sparse.search(questions, 10)
    want, want_scores = rrf_fuse([d10.row_ids, s10], 5, rrf_k=60.0, weights=(0.5, 0.5))
    np.testing.assert_array_equal(hybrid.row_ids, want)
    np.testing.assert_allclose(hybrid.scores, want_scores)
    assert all(pid for row in hybrid.ids for pid in row)
    weighted = with_retrieval(
        dense_index, root, RetrievalSettings(mode="hybrid", dense_weight=1.0)
    )  # the default fusion
    np.testing.assert_array_equal(weighted.search(xq, 5, questions=questions).row_ids, dense.row_ids)
    default = with_retrieval(dense_index, root, RetrievalSettings(mode="hybrid", candidates=10))
    sparse_scores, _ = index.sparse.search(questions, 10)
    want, want_scores = weighted_fuse([d10.row_ids, s10], [d10.scores, sparse_scores], 5, (0.5, 0.5))
    got = default.search(xq, 5, questions=questions)
    np.testing.assert_array_equal(got.row_ids, want)
    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-6)
    # a mode the version cannot serve: one line naming the fix
    plain = open_index(root, "v0", load_embeddings=False)
    with pytest.raises(ConfigError, match=r"needs a sparse index, but version v0 .* index.sparse: bm25"):
        with_retrieval(plain, root, RetrievalSettings(mode="sparse"))
    plain = open_index(root, "v0", load_embeddings=False)  # (the refusal closed the one it was given)
    assert with_retrieval(plain, root, RetrievalSettings()).search(xq, 3).row_ids.shape == (2, 3)


def test_retrieve_results_follow_the_retrieval_mode(tmp_path):
    import json

    import torch

    from raggen.train.retrieve import retrieve_results

    class ZeroEncoder:  # dense scores all tie: only the sparse side can find the passage
        def query_prefix_for(self, index_prefix):
            return index_prefix

        def encode(self, texts, prefix=""):
            return torch.zeros(len(texts), D)

    class Ex:
        def __init__(self, q, a):
            self.question, self.answers = q, a

    root = str(tmp_path / "root")
    publish(root, tmp_path, "v1")
    examples = [Ex(f"which one is item{i}", [f"item{i}"]) for i in (4, 25, 38)]
    out = tmp_path / "r.json"
    got = {}
    for mode in ("dense", "sparse", "hybrid"):
        index = with_retrieval(open_index(root, load_embeddings=False), root, RetrievalSettings(mode=mode))
        got[mode] = retrieve_results(examples, query_encoder=ZeroEncoder(), index=index, k=2, out=str(out))
    assert got["sparse"]["top1"] == 1.0 and got["hybrid"]["top2"] == 1.0 and got["dense"]["top2"] < 1.0
    assert json.loads(out.read_text())[1]["ctxs"][0]["id"] == "p25"


def test_load_sparse_from_a_root_or_a_version_folder(tmp_path):
    root = str(tmp_path / "root")
    publish(root, tmp_path, "v1")
    for uri, version in ((root, None), (root, "v1"), (f"{root}/v1", None), (f"{root}/v1", "v1")):
        assert load_sparse(uri, version).num_docs == 40
    with pytest.raises(IndexIntegrityError, match="expected 'v2'"):
        load_sparse(f"{root}/v1", "v2")
