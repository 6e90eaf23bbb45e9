"""Index builds without Ray: work dirs raggen owns (marker, lock, removal), run signatures that
follow the corpus content and every setting, splits of their own under a shared split_uri,
unique temporary shard files, and one format vocabulary and one passage check shared with
raggen.corpus.readers."""

from __future__ import annotations

import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from raggen.errors import ConfigError, DataError
from raggen.index import build as B
from raggen.index import encode as E
from raggen.index.passage_source import detect_format, normalize_passages
from raggen.index.shard_split import split_folder_uri
from raggen.index.work_dir import (
    WORK_MARKER,
    check_run_signature,
    default_work_dir,
    lock_work_dir,
    open_work_dir,
    remove_work_dir,
    run_signature,
)
from raggen.storage import StoreBusy

SIGNATURE = dict(encoder_name_or_path="enc", passages_format="auto", num_shards=2, pooling="mean", max_length=32,
                 normalize=False, passage_format=None)  # fmt: skip


def corpus(tmp_path, text: str = "old text"):
    path = tmp_path / "passages.tsv"
    path.write_text(f"id\ttext\ttitle\n1\t{text}\tT\n")
    return path


# ------------------------------------------------------------------------------------------ work dirs


def test_a_users_non_empty_folder_is_refused_before_any_work(tmp_path):
    home = tmp_path / "data"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"work_dir: .*data is not empty and was not created by raggen"):
        B.preflight_build(str(tmp_path / "ix"), None, faiss_factory="Flat", metric="ip", dim=4, work_dir=home)
    with pytest.raises(ConfigError, match="not created by raggen"):
        lock_work_dir(home)
    assert not remove_work_dir(home)
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


def test_a_work_dir_is_locked_while_a_run_uses_it(tmp_path):
    work = tmp_path / "work"
    info, lock = lock_work_dir(work)
    try:
        assert lock_work_dir(work)[0] == info  # the same thread again: reentrant (build -> encode)
        lock.release()
        failures = []

        def second_run():
            try:
                lock_work_dir(work)
            except StoreBusy as exc:
                failures.append(str(exc))

        t = threading.Thread(target=second_run)
        t.start()
        t.join()
        assert failures and "in use by another run" in failures[0]
    finally:
        lock.release()


def test_the_default_work_dir_in_use_gives_a_second_build_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    signature = {"corpus": [["a", 1, 2]]}
    first, _, lock = open_work_dir(None, signature)
    try:
        got = []
        t = threading.Thread(target=lambda: got.append(open_work_dir(None, signature)))
        t.start()
        t.join()
        second, _, lock2 = got[0]
        assert second != first and second.name.startswith(first.name + "-") and (second / WORK_MARKER).is_file()
        lock2.release()
    finally:
        lock.release()
    assert first == default_work_dir(**signature)  # free again: a rerun resumes the same one


def test_removal_deletes_what_raggen_made_and_keeps_a_users_empty_folder(tmp_path):
    made = tmp_path / "made"
    lock_work_dir(made)[1].release()
    (made / "encoded").mkdir()
    assert remove_work_dir(made) and not made.exists()
    given = tmp_path / "given"
    given.mkdir()
    lock_work_dir(given)[1].release()
    (given / "split.json").write_text("{}")
    assert remove_work_dir(given) and given.is_dir() and list(given.iterdir()) == []


# ------------------------------------------------------------------------------------------ run signatures


def test_the_run_signature_follows_the_corpus_content(tmp_path):
    path = corpus(tmp_path)
    before = run_signature(str(path), **SIGNATURE)
    assert before["corpus"][0][0] == "passages.tsv"
    time.sleep(0.01)
    corpus(tmp_path, "new text")  # fixed after a failed run: same URI, same size
    after = run_signature(str(path), **SIGNATURE)
    assert after["passages_uri"] == before["passages_uri"] and after != before
    assert default_work_dir(**before) != default_work_dir(**after)  # the default work dir is a fresh one
    work = tmp_path / "work"
    lock_work_dir(work)[1].release()
    check_run_signature(work, before)
    check_run_signature(work, before)  # same content: resumes
    with pytest.raises(ConfigError, match=r"holds work for another version of the corpus .* use a fresh work_dir"):
        check_run_signature(work, after)


@pytest.mark.parametrize("key, value", [("encoder_name_or_path", "other"), ("pooling", "cls"), ("max_length", 64),
                                        ("normalize", True), ("passage_format", "pair"), ("num_shards", 3),
                                        ("passages_format", "jsonl")])  # fmt: skip
def test_every_setting_that_changes_the_output_is_in_the_signature(tmp_path, key, value):
    path = corpus(tmp_path)
    assert run_signature(str(path), **{**SIGNATURE, key: value}) != run_signature(str(path), **SIGNATURE)


def test_aliases_of_one_format_give_one_signature(tmp_path):
    path = corpus(tmp_path)
    sigs = [run_signature(str(path), **{**SIGNATURE, "passages_format": f}) for f in ("tsv", "dpr", "dpr-tsv")]
    assert sigs[0] == sigs[1] == sigs[2] and sigs[0]["format"] == "dpr-tsv"


def test_a_local_encoder_folders_files_are_in_the_signature(tmp_path):
    path = corpus(tmp_path)
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "model.safetensors").write_bytes(b"weights v1")
    before = run_signature(str(path), **{**SIGNATURE, "encoder_name_or_path": str(enc)})
    time.sleep(0.01)
    (enc / "model.safetensors").write_bytes(b"weights v2")  # retrained in place
    assert run_signature(str(path), **{**SIGNATURE, "encoder_name_or_path": str(enc)}) != before


# ------------------------------------------------------------------------------------------ splits, temporary files


def test_runs_sharing_a_split_uri_get_folders_of_their_own(tmp_path):
    shared = tmp_path / "shared"
    a = split_folder_uri(tmp_path / "wa", str(shared), "aaaa")
    b = split_folder_uri(tmp_path / "wb", str(shared), "bbbb")
    assert a != b and a.startswith(str(shared) + "/") and b.startswith(str(shared) + "/")
    assert split_folder_uri(tmp_path / "wa", None, "aaaa") == str(tmp_path / "wa" / "split")
    assert (
        split_folder_uri(tmp_path / "w", "s3://bucket/tmp/split", "ab12") == "s3://bucket/tmp/split/raggen-split-ab12"
    )


def test_two_shard_writers_never_share_a_temporary_file(tmp_path):
    w1, w2 = E._ShardWriter(tmp_path, 0, 2, "src"), E._ShardWriter(tmp_path, 0, 2, "src")
    emb = np.ones((1, 4), np.float32)
    w1.append(["a"], ["t"], ["x"], emb)
    w2.append(["b"], ["t"], ["y"], emb)
    assert w1.file.tmp_path != w2.file.tmp_path and w1.file.tmp_path.exists() and w2.file.tmp_path.exists()
    w2.abort()
    assert not w2.file.tmp_path.exists()
    done = w1.finish(4)
    assert done.count == 1 and sorted(p.name for p in (tmp_path / "encoded").iterdir()) == [
        "shard-00000.parquet",
        "shard-00000.parquet.done.json",
    ]


# ------------------------------------------------------------------------------------------ one vocabulary, one check


def test_one_format_vocabulary_for_readers_the_ray_path_and_the_config():
    from raggen.config import IndexSection
    from raggen.corpus.readers import FORMATS, canonical_format

    config_names = set(IndexSection.model_fields["format"].annotation.__args__)
    assert config_names == {"auto", *FORMATS}
    assert [canonical_format(f) for f in ("tsv", "dpr", "dpr-tsv", "json", "jsonl", "parquet", "auto")] == [
        "dpr-tsv",
        "dpr-tsv",
        "dpr-tsv",
        "jsonl",
        "jsonl",
        "parquet",
        "auto",
    ]
    with pytest.raises(ConfigError, match="format: must be auto, dpr-tsv, jsonl, parquet"):
        canonical_format("csv")
    assert detect_format("s3://b/psgs_w100.tsv.gz") == "dpr-tsv" and detect_format("x/p.json") == "jsonl"


def _block(ids, texts, lines=None, path="s3://b/passages.tsv"):
    cols = {"id": pa.array(ids, pa.string()), "title": pa.array([""] * len(ids)), "text": pa.array(texts, pa.string())}
    if lines is not None:
        cols["line"] = pa.array(lines, pa.int64())
    cols["path"] = pa.array([path] * len(ids))
    return pa.table(cols)


@pytest.mark.parametrize("ids, texts, message", [
    (["1", " "], ["a", "b"], r"s3://b/passages\.tsv: line 8: empty passage id"),
    (["1", "2"], ["a", "   "], r"s3://b/passages\.tsv: line 8: empty passage text \(id '2'\)"),
    (["1", None], ["a", "b"], r"s3://b/passages\.tsv: line 8: column 'id' is null"),
    (["1", "2"], ["a", None], r"s3://b/passages\.tsv: line 8: column 'text' is null"),
])  # fmt: skip
def test_the_ray_path_rejects_empty_passages_with_the_readers_message(tmp_path, ids, texts, message):
    from raggen.corpus.readers import read_passages

    with pytest.raises(DataError, match=message):
        normalize_passages(_block(ids, texts, lines=[7, 8]), num_shards=2)
    if all(t is not None for t in texts) and all(i is not None for i in ids):  # the same rows, read by the readers
        bad = tmp_path / "passages.tsv"
        bad.write_text("id\ttext\ttitle\n" + "".join(f"{i}\t{t}\t\n" for i, t in zip(ids, texts)))
        with pytest.raises(DataError) as info:
            read_passages(bad)
        assert (
            str(info.value).split(": ", 1)[1].replace("line 3", "line 8") == message.replace("\\", "").split(": ", 1)[1]
        )


def test_a_block_without_line_numbers_names_the_row_and_good_blocks_pass():
    table = pa.table({"id": ["a", "b", ""], "text": ["x", "y", "z"]})
    with pytest.raises(DataError, match=r"passages: row 3: empty passage id"):
        normalize_passages(table)
    out = normalize_passages(_block([" a ", "b"], ["x", "y"], lines=[2, 3]), num_shards=4)
    assert out.column_names == ["id", "title", "text", "shard"] and out.column("id").to_pylist() == ["a", "b"]
    with pytest.raises(DataError, match=r"passages\.tsv: missing column 'text'"):
        normalize_passages(pa.table({"id": ["a"], "path": ["s3://b/passages.tsv"]}))


def test_the_datasource_parser_is_the_readers_parser(tmp_path):
    """What a Ray read task runs on a stream (a pyarrow input stream, .gz already decompressed)
    gives the readers' records and the readers' errors, file and line."""
    import gzip

    import pyarrow.fs as pafs

    from raggen.corpus.readers import iter_passage_records, read_passages

    good = tmp_path / "p.tsv.gz"
    good.write_bytes(gzip.compress(b'id\ttext\ttitle\n1\tone\tA\n2\t"two, quoted"\tB\n'))
    with pafs.LocalFileSystem().open_input_stream(str(good), compression="gzip") as f:
        recs = list(iter_passage_records(f, "s3://b/p.tsv.gz", "dpr-tsv"))
    assert recs[0].ids == ["1", "2"] and recs[0].texts == ["one", "two, quoted"] and recs[0].where == [2, 3]
    assert read_passages(good).text.tolist() == recs[0].texts
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\ttext\ttitle\n1\ta\tt\n2\tb\n")
    with pafs.LocalFileSystem().open_input_stream(str(bad)) as f, pytest.raises(DataError) as ray_err:
        list(iter_passage_records(f, str(bad), "dpr-tsv"))
    with pytest.raises(DataError) as reader_err:
        read_passages(bad)
    assert (
        str(ray_err.value)
        == str(reader_err.value)
        == f"{bad}: line 3: expected 3 tab-separated fields (id, text, title), found 2"
    )
