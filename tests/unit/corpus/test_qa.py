"""QA files: DPR's .qa.csv and JSONL, round trips and one-line errors naming file and line."""

from __future__ import annotations

import csv
import json

import pytest

from raggen.corpus import QAExample, read_qa, write_qa_csv, write_qa_jsonl
from raggen.errors import DataError

EXAMPLES = [
    QAExample("q1", "who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"], ["17"]),
    QAExample("q2", 'who sang "hey jude"?', ["The Beatles", "Beatles"], []),
    QAExample("q3", "what's o'brien's\tfirst name", ['Conan "Coco"', "it's"], ["1", "2"]),
]


def test_jsonl_round_trip_keeps_everything(tmp_path):
    path = write_qa_jsonl(tmp_path / "dev.jsonl", EXAMPLES)
    assert read_qa(path) == EXAMPLES


def test_csv_round_trip_keeps_questions_and_answers(tmp_path):
    path = write_qa_csv(tmp_path / "dev.qa.csv", EXAMPLES)
    back = read_qa(path)
    assert [(e.question, e.answers) for e in back] == [(e.question, e.answers) for e in EXAMPLES]
    assert [e.id for e in back] == ["0", "1", "2"] and all(e.gold_passage_ids == [] for e in back)
    # DPR's reader: csv.reader(delimiter="\t") then eval of the answers column
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert [eval(r[1]) for r in rows] == [e.answers for e in EXAMPLES]  # noqa: S307 - as DPR does


def test_reads_dpr_nq_lines(tmp_path):
    path = tmp_path / "nq-test.qa.csv"
    path.write_text(
        "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n"
        'when is the next deadpool movie being released\t["May 18 , 2018"]\n'
        "what's a \"real\" answer\t['x', \"y's\"]\n",
        encoding="utf-8",
    )
    qa = read_qa(path)
    assert [e.answers for e in qa] == [["Wilhelm Conrad Röntgen"], ["May 18 , 2018"], ["x", "y's"]]
    assert qa[2].question == 'what\'s a "real" answer'


BAD = [
    ("fields.qa.csv", "q one\t['a']\nq two\n", r"line 2: expected 2 tab-separated fields"),
    ("literal.qa.csv", "q one\t['a']\nq two\t['a'\n", r"line 2: answers are not a list literal"),
    ("notlist.qa.csv", "q one\t'a'\n", r"line 1: answers must be a list of strings"),
    ("ints.qa.csv", "q one\t[1, 2]\n", r"line 1: answers must be a list of strings"),
    ("noans.qa.csv", "q one\t['a']\n\nq two\t[]\n", r"line 3: no answers"),
    ("noq.qa.csv", "  \t['a']\n", r"line 1: empty question"),
    ("utf.qa.csv", b"q one\t['a']\nq \xff\t['b']\n", r"line 2: not valid UTF-8"),
    ("json.jsonl", '{"question": "q", "answers": ["a"]}\n{"question": \n', r"line 2: malformed JSON"),
    ("miss.jsonl", '{"id": "1", "answers": ["a"]}\n', r"line 1: missing column 'question'"),
    ("ans.jsonl", '{"id": "1", "question": "q", "answers": "a"}\n', r"line 1: answers must be a list"),
    (
        "dup.jsonl",
        '{"id": "1", "question": "q", "answers": ["a"]}\n{"id": "1", "question": "r", "answers": ["b"]}\n',
        r"line 2: duplicate question id '1'",
    ),
    (
        "gold.jsonl",
        '{"id": "1", "question": "q", "answers": ["a"], "gold_passage_ids": "p1"}\n',
        r"line 1: column 'gold_passage_ids' must be a list",
    ),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(DataError, match=message) as info:
        read_qa(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_jsonl_without_ids_numbers_rows_and_accepts_int_gold_ids(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(
        json.dumps({"question": "q", "answers": ["a"], "gold_passage_ids": [3]})
        + "\n"
        + json.dumps({"question": "r", "answers": ["b"]})
        + "\n"
    )
    assert read_qa(path) == [QAExample("0", "q", ["a"], ["3"]), QAExample("1", "r", ["b"], [])]


def test_unknown_extension_and_atomic_overwrite(tmp_path):
    with pytest.raises(DataError, match="cannot tell the QA format"):
        read_qa(tmp_path / "x.txt")
    path = write_qa_jsonl(tmp_path / "a.jsonl", EXAMPLES)
    with pytest.raises(AttributeError):
        write_qa_jsonl(path, [EXAMPLES[0], object()])  # type: ignore[list-item]
    assert read_qa(path) == EXAMPLES  # the failed write left the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]
