"""Passage readers (DPR TSV, JSONL, parquet), their one-line errors, and DPR-style chunking."""

from __future__ import annotations

import csv
import gzip
import json

import pandas as pd
import pytest

from raggen.corpus import (
    iter_passage_batches,
    read_passages,
    write_passages,
)
from raggen.errors import ConfigError, DataError

PASSAGES = pd.DataFrame(
    {
        "id": ["1", "2", "3", "wiki:7"],
        "text": ['Aaron ( or ; "Ahärôn") is a prophet', 'He said "hi"\tthen left', "plain text", "multi\nline text"],
        "title": ["Aaron", "", 'Zürich, "the" city', "T"],
    }
)


def _assert_same(df: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(df.columns) == ["id", "text", "title"]
    assert df.to_dict("records") == expected[["id", "text", "title"]].to_dict("records")


@pytest.mark.parametrize("name", ["p.tsv", "p.tsv.gz", "p.jsonl", "p.jsonl.gz", "p.parquet"])
def test_round_trip_every_format(tmp_path, name):
    path = write_passages(tmp_path / name, PASSAGES)
    _assert_same(read_passages(path), PASSAGES)


def test_reads_dpr_tsv_as_dpr_wrote_it(tmp_path):
    # the first lines of psgs_w100.tsv: text quoted, inner quotes doubled, header id/text/title
    raw = (
        "id\ttext\ttitle\n"
        '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet, high priest"\tAaron\n'
        '2\t"his sister Miriam"\tAaron\n'
        '3\tno quotes here\t"Aaron"\n'
    )
    path = tmp_path / "psgs_w100.tsv"
    path.write_text(raw, encoding="utf-8")
    df = read_passages(path)
    assert df.id.tolist() == ["1", "2", "3"]
    assert df.text[0] == 'Aaron Aaron ( or ; "Ahärôn") is a prophet, high priest'
    assert df.title.tolist() == ["Aaron"] * 3
    # pandas (as DPR users load it) agrees
    ref = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    assert ref.text.tolist() == df.text.tolist()


def test_jsonl_title_optional_and_int_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 5, "text": "a b"}\n\n{"id": "x", "text": "c", "title": null}\n')
    df = read_passages(path)
    assert df.to_dict("records") == [{"id": "5", "text": "a b", "title": ""}, {"id": "x", "text": "c", "title": ""}]


def test_batches_stream_with_bounded_size(tmp_path):
    n = 2503
    df = pd.DataFrame(
        {"id": [str(i) for i in range(1, n + 1)], "text": [f"t {i}" for i in range(n)], "title": ["x"] * n}
    )
    for name in ("big.tsv", "big.jsonl", "big.parquet"):
        path = write_passages(tmp_path / name, df)
        batches = list(iter_passage_batches(path, batch_size=1000))
        assert [len(b) for b in batches] == [1000, 1000, 503]
        _assert_same(pd.concat(batches, ignore_index=True), df)


def test_explicit_format_overrides_extension(tmp_path):
    path = tmp_path / "passages.txt"
    path.write_text("id\ttext\ttitle\n1\thello\tt\n")
    assert read_passages(path, format="tsv").text.tolist() == ["hello"]
    with pytest.raises(DataError, match="passages.txt"):
        read_passages(path)
    with pytest.raises(ConfigError, match=r"format: must be auto, dpr-tsv, jsonl, parquet .* got 'csv'"):
        read_passages(path, format="csv")


# --------------------------------------------------------------------------- bad files


def _write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    return path


BAD_FILES = [
    ("missing_col.tsv", "id\ttitle\n1\tt\n", r"line 1: missing column 'text'"),
    ("empty_text.tsv", "id\ttext\ttitle\n1\tok\tt\n2\t  \tt\n", r"line 3: empty passage text"),
    ("dup.tsv", "id\ttext\ttitle\n1\ta\tt\n2\tb\tt\n1\tc\tt\n", r"line 4: duplicate passage id '1'"),
    ("dup_str.tsv", "id\ttext\ttitle\nx\ta\tt\nx\tb\tt\n", r"line 3: duplicate passage id 'x'"),
    ("fields.tsv", "id\ttext\ttitle\n1\ta\tt\n2\tb\n", r"line 3: expected 3 tab-separated fields"),
    ("badutf8.tsv", b"id\ttext\ttitle\n1\ta\tt\n2\tb\xff\xfe\tt\n", r"line 3: not valid UTF-8"),
    ("badutf8.tsv.gz", b"id\ttext\ttitle\n1\ta\tt\n2\tb\xc3\tt\n", r"line 3: not valid UTF-8"),
    ("quote.tsv", 'id\ttext\ttitle\n1\ta\tt\n2\t"never closed\tt\n', r"line 3: malformed TSV"),
    ("empty.tsv", "", r"line 1: empty file"),
    ("bad.jsonl", '{"id": "1", "text": "a"}\n{"id": "2", "text": \n', r"line 2: malformed JSON"),
    ("nocol.jsonl", '{"id": "1", "text": "a"}\n{"id": "2"}\n', r"line 2: missing column 'text'"),
    ("notobj.jsonl", '{"id": "1", "text": "a"}\n[1, 2]\n', r"line 2: expected a JSON object"),
    ("empty.jsonl", '{"id": "1", "text": ""}\n', r"line 1: empty passage text"),
    ("dup.jsonl", '{"id": 3, "text": "a"}\n{"id": "3", "text": "b"}\n', r"line 2: duplicate passage id '3'"),
    ("type.jsonl", '{"id": "1", "text": ["a"]}\n', r"line 1: column 'text' must be a string"),
    ("badutf8.jsonl", b'{"id": "1", "text": "a"}\n{"id": "2", "text": "\xe9"}\n', r"line 2: not valid UTF-8"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_names_file_and_line(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=message) as info:
        read_passages(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path))


def test_bad_row_after_first_batch_is_caught_while_streaming(tmp_path):
    lines = ["id\ttext\ttitle"] + [f"{i}\tt{i}\tx" for i in range(1, 51)] + ["7\tdup\tx"]
    path = _write(tmp_path, "late.tsv", "\n".join(lines) + "\n")
    batches = iter_passage_batches(path, batch_size=10)
    assert len(next(batches)) == 10  # good rows stream before the bad one is reached
    with pytest.raises(DataError, match=r"late.tsv: line 52: duplicate passage id '7'"):
        list(batches)


def test_leading_zero_ids_are_distinct_from_plain_ones(tmp_path):
    path = _write(tmp_path, "z.tsv", "id\ttext\ttitle\n7\ta\tt\n007\tb\tt\n0\tc\tt\n00\td\tt\n")
    assert read_passages(path).id.tolist() == ["7", "007", "0", "00"]


@pytest.mark.parametrize("case", ["missing", "null", "empty", "dup"])
def test_bad_parquet_names_column_or_row(tmp_path, case):
    df = pd.DataFrame({"id": ["1", "2", "3"], "text": ["a", "b", "c"], "title": ["", "", ""]})
    if case == "missing":
        df = df.drop(columns="text")
        message = r"missing column 'text'"
    elif case == "null":
        df.loc[1, "text"] = None
        message = r"row 2: column 'text' is null"
    elif case == "empty":
        df.loc[2, "text"] = " "
        message = r"row 3: empty passage text"
    else:
        df.loc[2, "id"] = "1"
        message = r"row 3: duplicate passage id '1'"
    path = tmp_path / f"{case}.parquet"
    df.to_parquet(path)
    with pytest.raises(DataError, match=message) as info:
        read_passages(path)
    assert str(path) in str(info.value)


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_passages(tmp_path / "nope.tsv")
    lines = "id\ttext\ttitle\n" + "".join(f"{i}\tsome text {i}\tt\n" for i in range(1, 2000))
    truncated = tmp_path / "cut.tsv.gz"
    truncated.write_bytes(gzip.compress(lines.encode())[:3000])
    with pytest.raises(DataError, match=r"cut.tsv.gz: line \d+: cannot read"):
        read_passages(truncated)
    with pytest.raises(DataError, match="s3://bucket/p.tsv: corpus readers take local files"):
        read_passages("s3://bucket/p.tsv")
    not_gzip = _write(tmp_path, "plain.jsonl.gz", b"")
    not_gzip.write_bytes(b'{"id": "1", "text": "a"}\n')
    with pytest.raises(DataError, match=r"plain.jsonl.gz: line 1: cannot read"):
        read_passages(not_gzip)
    junk = _write(tmp_path, "junk.parquet", b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        read_passages(junk)


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    path = write_passages(tmp_path / "p.tsv", PASSAGES)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_passages(path, PASSAGES.drop(columns="text"))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tsv"]
    # the TSV is standard csv: the csv module reads it back field for field
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["id", "text", "title"] and rows[2][1] == PASSAGES.text[1]


def test_jsonl_writer_output_is_plain_json(tmp_path):
    path = write_passages(tmp_path / "p.jsonl", PASSAGES)
    objs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [o["id"] for o in objs] == PASSAGES.id.tolist()
