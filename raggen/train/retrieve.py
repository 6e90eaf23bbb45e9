"""``raggen retrieve``: DPR's retrieval-results JSON and its top-k accuracy table.

The output file is what DPR's ``dense_retriever.py`` writes (and FiD and other readers take): a
JSON list with, per question, ``{"question", "answers", "ctxs": [{"id", "title", "text", "score",
"has_answer"}, ...]}``, the contexts best first (``score`` is the retriever's, a JSON number;
DPR wrote it as a string, and readers call ``float()`` on it either way). ``has_answer`` is DPR's
answer matching and the accuracy table is DPR's "top-k accuracy", both through the very functions
``raggen eval`` reports its ``recall@k`` with (``raggen.train.evaluate``: ``retrieve_for_eval``,
``answer_hits``, ``recall_at_k``), so the two commands print the same numbers on the same index.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from raggen.errors import ConfigError

log = logging.getLogger(__name__)

DPR_KS = (1, 5, 20, 100)  # the depths DPR's papers report top-k accuracy at


def accuracy_ks(depth: int) -> list[int]:
    """DPR's k = 1, 5, 20, 100, each capped at the retrieval depth."""
    if depth < 1:
        raise ValueError(f"k must be >= 1, got {depth}")
    return sorted({min(k, depth) for k in DPR_KS})


def result_record(
    question: str,
    answers: Sequence[str],
    ids: Sequence[str],
    titles: Sequence[str],
    texts: Sequence[str],
    scores: Sequence[float],
    hits: Sequence[bool],
) -> dict:
    """One question's entry of DPR's results file; empty slots (fewer passages than k) are dropped."""
    ctxs = [
        {"id": pid, "title": title, "text": text, "score": float(score), "has_answer": bool(hit)}
        for pid, title, text, score, hit in zip(ids, titles, texts, scores, hits)
        if pid
    ]
    return {"question": question, "answers": list(answers), "ctxs": ctxs}


@contextlib.contextmanager
def output_file(uri: str, s3_options=None, mode: str = "w") -> Iterator[IO]:
    """A file to stream into that appears at ``uri`` whole or not at all: a local path through
    raggen.storage's atomic writer, an ``s3://`` URI uploaded (one PUT) once written."""
    from raggen.storage import atomic_writer, is_s3_uri, open_store

    if not is_s3_uri(uri):
        with atomic_writer(Path(os.path.expanduser(uri)), mode) as f:
            yield f
        return
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name:
        raise ConfigError(f"{uri}: expected an object URI, e.g. s3://bucket/results.json")
    with tempfile.TemporaryDirectory(prefix="raggen-out-") as tmp:
        local = Path(tmp) / name
        with open(local, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        open_store(parent, s3_options).upload_file(local, name)


def write_jsonl(uri: str, records: Iterable[dict], s3_options=None) -> str:
    """One JSON object a line, written atomically to a path or an s3:// URI."""
    with output_file(uri, s3_options) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return uri


def retrieve_results(
    examples: Sequence, *, query_encoder, index, k: int, out: str, s3_options=None, batch_size: int = 32, progress=None
) -> dict[str, float]:
    """Retrieve the top ``k`` passages of every example, stream DPR's results JSON to ``out`` and
    return the top-k accuracy at :func:`accuracy_ks` (``{"top1": ..., "top5": ...}``)."""
    from raggen.train.evaluate import retrieve_for_eval
    from raggen.train.qa_scores import answer_hits, recall_at_k

    if not examples:
        raise ConfigError("retrieve: no questions to retrieve for")
    hits: list[list[bool]] = []
    with output_file(out, s3_options) as f:
        f.write("[\n")
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            got = retrieve_for_eval(query_encoder, index, [ex.question for ex in chunk], k)
            rows = answer_hits(got.texts, [ex.answers for ex in chunk])  # (b, k): the hits eval counts
            hits += rows
            for i, ex in enumerate(chunk):
                rec = result_record(
                    ex.question, ex.answers, got.ids[i], got.titles[i], got.texts[i], got.scores[i].tolist(), rows[i]
                )
                f.write(("" if start + i == 0 else ",\n") + json.dumps(rec, ensure_ascii=False))
            if progress:
                progress(len(chunk))
        f.write("\n]\n")
    return {f"top{kk}": v for kk, v in recall_at_k(hits, accuracy_ks(k)).items()}


def format_accuracy(accuracy: dict[str, float], num_questions: int) -> str:
    """The top-k accuracy table, as DPR logs it: one line per k."""
    lines = [f"top-k accuracy over {num_questions} questions", f"{'k':>5}  accuracy"]
    lines += [f"{key[3:]:>5}  {value:.4f}" for key, value in accuracy.items()]
    return "\n".join(lines)
