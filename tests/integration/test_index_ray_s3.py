"""Encode with Ray Data (2 actors) into 3 shards, publish to a moto S3 server, load it back (also
through ShardActors) and compare with one exact IndexFlatIP; tampered uploads are refused while
LATEST keeps serving the previous version; an interrupted encode resumes only unfinished shards."""

from __future__ import annotations

import json
import uuid

import faiss
import numpy as np
import pytest

from raggen.errors import DataError, IndexIntegrityError
from raggen.index import (
    IndexBuildSettings,
    Manifest,
    ShardedIndex,
    build_index,
    embeddings_of,
    encode_passages,
    load_version,
    publish_version,
    read_latest,
    set_latest,
)
from raggen.models.retriever import EncoderSpec
from raggen.storage import download, s3_client

pytestmark = pytest.mark.integration

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MAX_LENGTH = 64
ENCODER = EncoderSpec(name_or_path=MINILM, max_length=MAX_LENGTH)
BUILT = IndexBuildSettings(
    batch_size=16, num_shards=3, num_actors=2, actor_num_cpus=0.5, faiss_factory="Flat", metric="ip"
)
QUESTIONS = ["Where was he born?", "Which company makes lanterns?", "What colour does his sister adore?",
             "Who plays the oboe?", "In which town does she live?"]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_cluster, moto_s3):
    """The world's passages uploaded to S3, encoded and published there as version v1."""
    from raggen.corpus.world import WorldConfig, write_world

    out = tmp_path_factory.mktemp("index-s3")
    files = write_world(out / "world", WorldConfig(num_entities=30, seed=0))
    bucket = f"raggen-{uuid.uuid4().hex[:12]}"
    client = s3_client(moto_s3)
    client.create_bucket(Bucket=bucket)
    client.upload_file(str(files.passages_v1), bucket, "corpus/passages.tsv")
    root = f"s3://{bucket}/index"
    manifest = build_index(
        f"s3://{bucket}/corpus/passages.tsv", root, encoder=ENCODER, settings=BUILT, version="v1", work_dir=out / "work", keep_work_dir=True, split_uri=f"s3://{bucket}/tmp/split", s3_options=moto_s3,
    )  # fmt: skip
    return dict(out=out, files=files, bucket=bucket, root=root, manifest=manifest, s3=moto_s3, client=client)


def exact_flat(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)


def query_vectors() -> np.ndarray:
    from raggen.models.retriever import TextEncoder

    encoder = TextEncoder.from_pretrained(MINILM, pooling="mean", max_length=MAX_LENGTH)
    return encoder.encode(QUESTIONS).numpy()  # (5, 384)


def test_published_manifest_and_pointer_on_s3(built):
    import pandas as pd

    m = built["manifest"]
    n = len(pd.read_csv(built["files"].passages_v1, sep="\t", dtype=str))
    assert m.version == "v1" and m.num_passages == n and len(m.shards) == 3
    assert m.encoder.dim == 384 and m.metric == "ip" and m.faiss_factory == "Flat"
    assert all(s.count > 0 for s in m.shards)  # crc32 sharding spreads ~60 passages over 3 shards
    body = built["client"].get_object(Bucket=built["bucket"], Key="index/LATEST")["Body"].read()
    assert body == b"v1\n"
    on_s3 = json.loads(built["client"].get_object(Bucket=built["bucket"], Key="index/v1/manifest.json")["Body"].read())
    assert Manifest.model_validate(on_s3) == m


def test_loaded_index_matches_one_exact_flat_index(built, tmp_path):
    from raggen.models.retriever import TextEncoder, passage_text

    loaded = load_version(built["root"], s3_options=built["s3"], cache_dir=tmp_path / "cache")
    assert loaded.version == "v1"
    xb = np.concatenate([embeddings_of(s.passages) for s in loaded.shards])  # (n, 384)
    pids = [p for s in loaded.shards for p in s.passages.column("id").to_pylist()]
    assert len(set(pids)) == len(pids) == built["manifest"].num_passages

    # the Ray actors' embeddings are what a plain encoder gives for "title . text"
    titles = [t for s in loaded.shards for t in s.passages.column("title").to_pylist()]
    texts = [t for s in loaded.shards for t in s.passages.column("text").to_pylist()]
    direct = (
        TextEncoder.from_pretrained(MINILM, pooling="mean", max_length=MAX_LENGTH)
        .encode([passage_text(t, x) for t, x in zip(titles, texts)])
        .numpy()
    )
    np.testing.assert_allclose(xb, direct, atol=1e-4)

    xq = query_vectors()
    ref_scores, ref_rows = exact_flat(xb, xq, 10)
    expected_ids = [[pids[r] for r in row] for row in ref_rows]
    local = ShardedIndex.from_version(loaded)
    result = local.search(xq, 10)
    assert result.ids == expected_ids
    np.testing.assert_allclose(result.scores, ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.embeddings, xb[ref_rows])

    actors = ShardedIndex.from_version(loaded, use_actors=True, actor_num_cpus=0.25)
    try:
        through_actors = actors.search(xq, 10)
        assert through_actors.ids == expected_ids
        assert through_actors.titles == result.titles and through_actors.texts == result.texts
        np.testing.assert_allclose(through_actors.scores, ref_scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(through_actors.embeddings, result.embeddings)
    finally:
        actors.close()


def _copy_version(built, src: str, dst: str, *, edit_manifest=None, truncate: str | None = None) -> None:
    """Upload a copy of version ``src`` as ``dst`` straight through boto3 (as a broken uploader would)."""
    client, bucket = built["client"], built["bucket"]
    for name in [n for s in built["manifest"].shards for n in (s.index, s.passages)]:
        body = client.get_object(Bucket=bucket, Key=f"index/{src}/{name}")["Body"].read()
        if name == truncate:
            body = body[: len(body) // 2]
        client.put_object(Bucket=bucket, Key=f"index/{dst}/{name}", Body=body)
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"index/{src}/manifest.json")["Body"].read())
    manifest["version"] = dst
    if edit_manifest:
        edit_manifest(manifest)
    client.put_object(Bucket=bucket, Key=f"index/{dst}/manifest.json", Body=json.dumps(manifest).encode())


def test_truncated_upload_and_wrong_checksum_are_refused_latest_keeps_loading(built, tmp_path):
    root, s3 = built["root"], built["s3"]
    _copy_version(built, "v1", "v2-truncated", truncate="shard-00001.faiss")
    with pytest.raises(IndexIntegrityError, match=r"v2-truncated/shard-00001\.faiss: sha256 mismatch"):
        load_version(root, "v2-truncated", s3_options=s3, cache_dir=tmp_path / "cache")
    with pytest.raises(IndexIntegrityError, match=r"shard-00001\.faiss"):
        set_latest(root, "v2-truncated", s3_options=s3)

    _copy_version(built, "v1", "v3-badsum", edit_manifest=lambda m: m["shards"][2].update(passages_sha256="ab" * 32))
    with pytest.raises(IndexIntegrityError, match=r"v3-badsum/shard-00002\.parquet: sha256 mismatch"):
        load_version(root, "v3-badsum", s3_options=s3, cache_dir=tmp_path / "cache")

    # publish_version itself refuses an upload whose read-back differs from its manifest
    local = tmp_path / "v1-local"
    download(f"{root}/v1", local, s3_options=s3)
    manifest = Manifest.model_validate_json((local / "manifest.json").read_text()).model_copy(update={"version": "v4"})
    (local / "shard-00000.faiss").write_bytes((local / "shard-00000.faiss").read_bytes()[:-10])
    with pytest.raises(IndexIntegrityError, match=r"v4/shard-00000\.faiss: sha256 .* LATEST not moved"):
        publish_version(root, manifest, local, s3_options=s3)

    assert read_latest(root, s3_options=s3) == "v1"
    assert load_version(root, s3_options=s3, cache_dir=tmp_path / "cache").version == "v1"


def test_interrupted_encode_redoes_only_unfinished_shards(built):
    work = built["out"] / "work"
    encoded = work / "encoded"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in encoded.glob("shard-*.parquet")}
    assert len(before) == 3
    (encoded / "shard-00001.parquet.done.json").unlink()  # as if the run died while writing shard 1
    (encoded / "shard-00001.parquet").unlink()
    result = encode_passages(
        f"s3://{built['bucket']}/corpus/passages.tsv", work, encoder=ENCODER, settings=BUILT, s3_options=built["s3"],
        split_uri=f"s3://{built['bucket']}/tmp/split",
    )  # fmt: skip
    after = {p.name: p.stat().st_mtime_ns for p in encoded.glob("shard-*.parquet")}
    assert after["shard-00000.parquet"] == before["shard-00000.parquet"][0]  # untouched
    assert after["shard-00002.parquet"] == before["shard-00002.parquet"][0]
    redone = result.shards[1]
    assert redone.count == built["manifest"].shards[1].count
    import pyarrow.parquet as pq

    old = pq.read_table(__import__("io").BytesIO(before["shard-00001.parquet"][1]))
    new = pq.read_table(redone.path)
    assert sorted(new.column("id").to_pylist()) == sorted(old.column("id").to_pylist())
    order_old = np.argsort(old.column("id").to_pylist())
    order_new = np.argsort(new.column("id").to_pylist())
    np.testing.assert_allclose(embeddings_of(new)[order_new], embeddings_of(old)[order_old], atol=1e-5)


def test_passages_without_text_column_is_a_data_error(ray_cluster, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "A"}\n{"id": "b", "title": "B"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 1: missing column 'text' \(columns: \['id', 'title'\]\)"):
        encode_passages(str(bad), tmp_path / "work", encoder=ENCODER,
                        settings=IndexBuildSettings(num_shards=2, num_actors=1, actor_num_cpus=0.5))  # fmt: skip


def test_qa_files_read_from_s3_equal_the_local_ones(s3_bucket, tmp_path):
    """``train.train_file``/``dev_file`` may be ``s3://`` objects (the wiki recipe's QA files are):
    JSONL and DPR's .qa.csv read back from the moto server as they read locally; a missing key is a
    DataError naming it."""
    from raggen.corpus.qa import QAExample, read_qa, write_qa_csv, write_qa_jsonl
    from raggen.storage import upload_dir

    bucket, options = s3_bucket
    examples = [
        QAExample("a", "Where was he born?", ["Fofobid", "fofobid town"], ["p1"]),
        QAExample("b", "Who, then?", ["Radusk Mills"], []),
    ]
    write_qa_jsonl(tmp_path / "qa" / "dev.jsonl", examples)
    write_qa_csv(tmp_path / "qa" / "nq-test.qa.csv", examples)
    upload_dir(tmp_path / "qa", f"s3://{bucket}/qa", options)
    for name in ("dev.jsonl", "nq-test.qa.csv"):
        remote = read_qa(f"s3://{bucket}/qa/{name}", s3_options=options)
        local = read_qa(tmp_path / "qa" / name)
        assert [(e.question, e.answers) for e in remote] == [(e.question, e.answers) for e in local]
    assert read_qa(f"s3://{bucket}/qa/dev.jsonl", s3_options=options)[0].gold_passage_ids == ["p1"]
    with pytest.raises(DataError, match="missing.jsonl"):
        read_qa(f"s3://{bucket}/qa/missing.jsonl", s3_options=options)


def _vectors_by_id(loaded) -> dict[str, np.ndarray]:
    return {
        i: v for sh in loaded.shards for i, v in zip(sh.passages.column("id").to_pylist(), embeddings_of(sh.passages))
    }


def test_normalize_and_prompts_reach_the_encoder_actors_the_manifest_and_the_search(built, tmp_path):
    """``index.encoder.normalize`` (cosine, as MiniLM was trained) and an E5-style model's prompts:
    the Ray Data actors encode every passage after ``passage_prefix`` and L2-normalise it, exactly as
    the spec's encoder does in this process; the manifest records both; ``raggen index search``
    puts the recorded ``query_prefix`` before each question, unless the query encoder sets its own."""
    from raggen.retrieval.search import search_index

    spec = ENCODER.model_copy(update={"normalize": True, "query_prefix": "query: ", "passage_prefix": "passage: "})
    root = str(tmp_path / "ix-normalized")
    manifest = build_index(str(built["files"].passages_v1), root, encoder=spec,
                           settings=IndexBuildSettings(num_shards=1, actor_num_cpus=0.5),
                           work_dir=tmp_path / "work")  # fmt: skip
    assert built["manifest"].encoder.normalize is False and built["manifest"].encoder.passage_prefix == ""
    on_disk = Manifest.model_validate_json(manifest.to_json()).encoder
    assert (on_disk.normalize, on_disk.query_prefix, on_disk.passage_prefix) == (True, "query: ", "passage: ")
    assert "query_prefix" not in json.loads(built["manifest"].to_json())["encoder"]  # optional: absent when none

    loaded = load_version(root)
    normalized = _vectors_by_id(loaded)
    plain = _vectors_by_id(load_version(built["root"], s3_options=built["s3"], cache_dir=tmp_path / "cache"))
    ids = sorted(plain)
    assert sorted(normalized) == ids and len(ids) == built["manifest"].num_passages
    got = np.stack([normalized[i] for i in ids])
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    table = loaded.shards[0].passages
    titles, texts, order = (table.column(c).to_pylist() for c in ("title", "text", "id"))
    encoder = spec.load().eval()
    want = encoder.encode_passages(titles, texts).numpy()
    np.testing.assert_allclose(embeddings_of(table), want, atol=1e-5)
    unprompted = ENCODER.model_copy(update={"normalize": True}).load().eval()
    assert not np.allclose(unprompted.encode_passages(titles, texts).numpy(), want, atol=1e-3)

    # the CLI search encodes "query: <question>" with the recorded prompt
    result = search_index(root, QUESTIONS[:2], k=3, max_length=MAX_LENGTH)
    xq = unprompted.encode([f"query: {q}" for q in QUESTIONS[:2]]).numpy()
    scores, rows = exact_flat(embeddings_of(table), xq, 3)
    assert [[order[r] for r in row] for row in rows] == result.ids
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-5)
    # a query encoder that sets its own prefix ("": none) keeps it
    from raggen.index import open_index
    from raggen.retrieval.search import encode_and_search

    own = ENCODER.model_copy(update={"normalize": True, "query_prefix": ""}).load().eval()
    index = open_index(root)
    try:
        mine = encode_and_search(own, index, QUESTIONS[:2], 3)
    finally:
        index.close()
    np.testing.assert_allclose(mine.scores, exact_flat(embeddings_of(table), own.encode(QUESTIONS[:2]).numpy(), 3)[0],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert not np.allclose(mine.scores, result.scores, atol=1e-3)


def test_refresh_with_s3_storage_publishes_the_encoder_snapshot_where_every_node_reads_it(
    ray_cluster, tmp_path, s3_bucket
):
    """A run that stores to S3 uploads each passage-encoder snapshot there; the Ray Data actors
    download it, the refreshed manifest names it, and the vectors are that encoder's."""
    from raggen.models import TextEncoder, make_tiny_encoder
    from raggen.storage import list_uri
    from raggen.train.refresh import RefreshSpec, build_refreshed_index

    bucket, options = s3_bucket
    passages = tmp_path / "p.tsv"
    passages.write_text(
        "id\ttext\ttitle\n"
        + "".join(f"{i}\tpassage {i} is about {w}\tT{i}\n" for i, w in enumerate(["oats", "rivers", "lutes"]))
    )
    encoder = TextEncoder.from_pretrained(make_tiny_encoder(str(tmp_path / "enc"), d_model=32, heads=2))
    spec = RefreshSpec(
        every=1,
        passages_uri=str(passages),
        output_uri=f"s3://{bucket}/runs/r/index",
        staging_dir=str(tmp_path / "staging"),
        s3=options,
        snapshot_uri=f"s3://{bucket}/runs/r/refresh",
        encoder=EncoderSpec(name_or_path=str(tmp_path / "enc"), pooling="mean", max_length=32),  # each snapshot's
        settings=IndexBuildSettings(num_shards=1, actor_num_cpus=0.5),
    )
    version = build_refreshed_index(encoder, spec, step=7)
    snapshot = f"s3://{bucket}/runs/r/refresh/passage-encoder-step-0000007"
    assert "config.json" in list_uri(snapshot, options)
    loaded = load_version(spec.output_uri, version, s3_options=options)
    assert loaded.manifest.encoder.name_or_path == snapshot and loaded.manifest.encoder.dim == 32
    table = loaded.shards[0].passages
    from raggen.models.retriever import passage_text

    texts = [passage_text(t, x) for t, x in zip(table.column("title").to_pylist(), table.column("text").to_pylist())]
    local = TextEncoder.from_pretrained(str(tmp_path / "staging" / "passage-encoder-step-0000007"), max_length=32)
    np.testing.assert_allclose(embeddings_of(table), local.encode(texts).numpy(), atol=1e-5)
