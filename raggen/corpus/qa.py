"""Question-answer files: DPR's ``*.qa.csv`` and a JSONL form that also keeps ids and gold passages.

DPR's ``nq-test.qa.csv`` has no header; each line is ``question<TAB>['answer', ...]`` where the
answers are a Python list literal (DPR wrote ``str(list)`` and reads it back with ``eval``).
A CSV file has no ids, so its examples get their 0-based row index as id.
"""

from __future__ import annotations

import ast
import csv
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from raggen.corpus.readers import atomic_writer
from raggen.corpus.text_files import iter_jsonl_objects, iter_tsv_rows, local_path
from raggen.errors import DataError
from raggen.storage import is_s3_uri, read_bytes


@dataclass
class QAExample:
    """One question with its acceptable answers; ``gold_passage_ids`` is empty when unknown."""

    id: str
    question: str
    answers: list[str]
    gold_passage_ids: list[str] = field(default_factory=list)


def detect_qa_format(path: str | Path, format: str = "auto") -> str:
    """``csv`` (DPR's tab-separated ``.qa.csv``/``.tsv``) or ``jsonl``."""
    if format != "auto":
        if format not in ("csv", "jsonl"):
            raise ValueError(f"format must be auto, csv or jsonl; got {format!r}")
        return format
    name = Path(path).name.lower().removesuffix(".gz")
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith(".jsonl"):
        return "jsonl"
    raise DataError(f"{path}: cannot tell the QA format from the file name (expected .csv, .tsv or .jsonl)")


def _parse_answer_list(path: Path, lineno: int, raw: object, literal: bool) -> list[str]:
    """A non-empty list of strings: a JSON value, or (``literal``) DPR's Python list literal."""
    value = raw
    if literal and isinstance(raw, str):
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise DataError(f"{path}: line {lineno}: answers are not a list literal: {raw[:60]!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise DataError(f"{path}: line {lineno}: answers must be a list of strings, got {str(raw)[:60]!r}")
    answers = [a for a in value if a.strip()]
    if not answers:
        raise DataError(f"{path}: line {lineno}: no answers")
    return answers


def _check_question(path: Path, lineno: int, question: object) -> str:
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{path}: line {lineno}: empty question")
    return question.strip()


def _read_qa_csv(path: Path) -> list[QAExample]:
    examples: list[QAExample] = []
    for lineno, row in iter_tsv_rows(path, strict=False):  # as DPR reads its QA files
        if len(row) != 2:
            raise DataError(
                f"{path}: line {lineno}: expected 2 tab-separated fields (question, answers), found {len(row)}"
            )
        question = _check_question(path, lineno, row[0])
        answers = _parse_answer_list(path, lineno, row[1], literal=True)
        examples.append(QAExample(id=str(len(examples)), question=question, answers=answers))
    return examples


def _read_qa_jsonl(path: Path) -> list[QAExample]:
    examples: list[QAExample] = []
    seen: set[str] = set()
    for lineno, obj in iter_jsonl_objects(path):
        for key in ("question", "answers"):
            if key not in obj:
                raise DataError(f"{path}: line {lineno}: missing column {key!r}")
        qid = obj.get("id", len(examples))
        if isinstance(qid, bool) or not isinstance(qid, (str, int)) or not str(qid).strip():
            raise DataError(f"{path}: line {lineno}: column 'id' must be a non-empty string")
        qid = str(qid)
        if qid in seen:
            raise DataError(f"{path}: line {lineno}: duplicate question id {qid!r}")
        seen.add(qid)
        gold = obj.get("gold_passage_ids") or []
        if not isinstance(gold, list) or not all(isinstance(g, (str, int)) for g in gold):
            raise DataError(f"{path}: line {lineno}: column 'gold_passage_ids' must be a list of ids")
        examples.append(
            QAExample(
                id=qid,
                question=_check_question(path, lineno, obj["question"]),
                answers=_parse_answer_list(path, lineno, obj["answers"], literal=False),
                gold_passage_ids=[str(g) for g in gold],
            )
        )
    return examples


def read_qa(path: str | Path, format: str = "auto", s3_options=None) -> list[QAExample]:
    """Read DPR ``.qa.csv`` or QA JSONL, a local file or an ``s3://`` object (fetched to a temp
    file first); a bad row is a one-line DataError naming file and line."""
    if isinstance(path, str) and is_s3_uri(path):
        return _read_remote_qa(path, format, s3_options)
    path = local_path(path)
    if detect_qa_format(path, format) == "csv":
        return _read_qa_csv(path)
    return _read_qa_jsonl(path)


def _read_remote_qa(uri: str, format: str, s3_options) -> list[QAExample]:
    with tempfile.TemporaryDirectory(prefix="raggen-qa-") as tmp:
        local = Path(tmp, uri.rstrip("/").rsplit("/", 1)[-1])  # keeps the suffix that names the format
        try:
            local.write_bytes(read_bytes(uri, s3_options))
        except FileNotFoundError:
            raise DataError(f"{uri}: no such object") from None
        examples = read_qa(local, format)
    return examples


def write_qa_csv(path: str | Path, examples: Iterable[QAExample]) -> Path:
    """DPR's layout: ``question<TAB>str(answers)``, no header (ids and gold passages are dropped)."""
    path = Path(path)
    with atomic_writer(path) as f:
        writer = csv.writer(f, delimiter="\t", quotechar='"', lineterminator="\n")
        for ex in examples:
            writer.writerow([ex.question, repr(list(ex.answers))])
    return path


def write_qa_jsonl(path: str | Path, examples: Iterable[QAExample]) -> Path:
    """One ``{"id", "question", "answers", "gold_passage_ids"}`` object per line."""
    path = Path(path)
    with atomic_writer(path) as f:
        for ex in examples:
            f.write(
                json.dumps(
                    {
                        "id": ex.id,
                        "question": ex.question,
                        "answers": list(ex.answers),
                        "gold_passage_ids": list(ex.gold_passage_ids),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    return path
