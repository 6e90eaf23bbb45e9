"""``build_index`` with ``IndexBuildSettings(sparse="bm25")`` end to end on Ray into an S3 root (moto): the BM25 files are
built in a Ray task, published and verified with the version, searched through ``raggen
retrieve``'s path in every mode, refused when corrupt, and removed with the version."""

from __future__ import annotations

import numpy as np
import pytest

from raggen.errors import IndexIntegrityError
from raggen.index import IndexBuildSettings, SearchSettings, build_index, open_index, verify_version
from raggen.index import lifecycle as L
from raggen.index.sparse import load_sparse
from raggen.models.retriever import EncoderSpec
from raggen.retrieval import RetrievalSettings, with_retrieval
from raggen.storage import s3_client

pytestmark = pytest.mark.integration

WORDS = ["heron", "basalt", "juniper", "quasar", "marimba", "tundra", "sextant", "cobalt", "saffron", "fjord"]


def test_build_publish_search_and_remove_a_bm25_index_on_s3(ray_cluster, s3_bucket, tmp_path):
    from raggen.models.tiny import make_tiny_encoder

    bucket, opts = s3_bucket
    enc = make_tiny_encoder(str(tmp_path / "enc"))
    passages = tmp_path / "p.tsv"
    rows = [f"p{i}\tthe {WORDS[i % 10]} of {WORDS[(i * 7) % 10]} number{i}\tT{i}" for i in range(60)]
    passages.write_text("id\ttext\ttitle\n" + "\n".join(rows) + "\n")
    root = f"s3://{bucket}/index"
    for version in ("v1", "v2"):
        m = build_index(
            str(passages),
            root,
            encoder=EncoderSpec(name_or_path=enc, max_length=32),
            settings=IndexBuildSettings(num_shards=3, num_actors=1, actor_num_cpus=0.5, sparse="bm25"),
            search=SearchSettings(target_recall=None),
            version=version,
            work_dir=tmp_path / f"work-{version}",
            s3_options=opts,
        )
        assert m.sparse is not None and m.sparse.count == 60
    verify_version(root, "v2", s3_options=opts, cache_dir=tmp_path / "cache")
    index = with_retrieval(
        open_index(root, s3_options=opts, cache_dir=tmp_path / "cache", load_embeddings=False),
        root,
        RetrievalSettings(mode="hybrid"),
        s3_options=opts,
        cache_dir=tmp_path / "cache",
    )
    xq = np.zeros((1, index.dim), np.float32)
    got = index.search(xq, 3, questions=["number17 please"], mode="sparse")
    assert got.ids[0][0] == "p17" and "number17" in got.texts[0][0]
    assert "p17" in index.search(xq, 5, questions=["number17 please"]).ids[0]  # hybrid
    index.close()
    # a corrupt BM25 file in the store is refused by verify and by the loader (which reads the store)
    client = s3_client(opts)
    key = f"index/v1/{m.sparse.files[0].name}"
    client.put_object(Bucket=bucket, Key=key, Body=b"garbage")
    with pytest.raises(IndexIntegrityError, match="sha256 mismatch"):
        verify_version(root, "v1", s3_options=opts, cache_dir=tmp_path / "cache2")
    with pytest.raises(IndexIntegrityError, match="sha256 mismatch"):
        load_sparse(root, "v1", s3_options=opts, cache_dir=tmp_path / "cache2")
    L.remove_version(root, "v1", s3_options=opts)
    left = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="index/v1/").get("Contents", [])]
    assert left == []
