"""Held-out means held out: the questions a run (or a test) scores as held-out are never trained on.

A question counts as seen when its id or its normalised text (lower case, punctuation and articles
dropped, as answers are compared) is in the training set: the same question under another id, or
with different case or punctuation, is still the same question.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from raggen.errors import ConfigError
from raggen.train.qa_scores import normalize_answer

log = logging.getLogger(__name__)


def _id_and_question(example: Any) -> tuple[str, str]:
    if isinstance(example, dict):
        return str(example["id"]), str(example["question"])
    return str(example.id), str(example.question)


def question_key(question: str) -> str:
    return normalize_answer(question)


def seen_in(train: Iterable[Any], heldout: Iterable[Any], *, match_ids: bool = True) -> list[str]:
    """Ids of the ``heldout`` examples whose id or normalised question is among ``train``'s.
    ``match_ids=False`` compares questions only: for positional ids (a DPR ``.qa.csv`` numbers its
    rows 0, 1, ...), equal ids across two files say nothing."""
    ids, questions = set(), set()
    for ex in train:
        i, q = _id_and_question(ex)
        ids.add(i)
        questions.add(question_key(q))
    out = []
    for ex in heldout:
        i, q = _id_and_question(ex)
        if (match_ids and i in ids) or question_key(q) in questions:
            out.append(i)
    return out


def check_heldout(train: Iterable[Any], heldout: Iterable[Any], *, what: str = "the held-out set") -> None:
    """ConfigError (one line, naming ``what``) when any held-out question is a training question."""
    overlap = seen_in(train, heldout)
    if overlap:
        shown = ", ".join(overlap[:5]) + (f" (+{len(overlap) - 5} more)" if len(overlap) > 5 else "")
        raise ConfigError(
            f"{what}: {len(overlap)} question(s) are also training questions ({shown}); "
            "a held-out score on them would measure memorisation, not generalisation"
        )


def split_heldout(examples: Sequence[Any], num_train: int, num_heldout: int) -> tuple[list[Any], list[Any]]:
    """The first ``num_train`` examples to train on, and the first ``num_heldout`` of the rest whose
    id and question are not among them (a repeated question is skipped, never scored as held-out)."""
    train = list(examples[:num_train])
    rest = list(examples[num_train:])
    seen = set(seen_in(train, rest))
    heldout = [ex for ex in rest if _id_and_question(ex)[0] not in seen][:num_heldout]
    if len(heldout) < num_heldout:
        raise ConfigError(
            f"held-out split: only {len(heldout)} of the {num_heldout} held-out questions asked for "
            f"remain after the {num_train} training questions"
        )
    return train, heldout


def positional_ids(examples: Sequence[Any]) -> bool:
    """True when the ids are the row numbers ("0", "1", ...): what a DPR ``.qa.csv`` or a JSONL
    without ids gets (``raggen.corpus.qa``), so they name no question."""
    return all(_id_and_question(ex)[0] == str(i) for i, ex in enumerate(examples))


def check_dev_file(train_items: Sequence[Any], dev_file: str | None, limit: int | None, s3_options=None) -> list[str]:
    """Ids of ``train.dev_file``'s questions (its first ``limit``; None: all) that are also training
    questions, logged as a WARNING: the in-run eval leaves them out (public data sets such as NQ
    repeat a few training questions in dev; the generated world's splits are disjoint by construction).
    A dev file made only of training questions is a ConfigError: the eval would have nothing to score.
    Ids are compared only when both files carry their own, not row numbers (:func:`positional_ids`)."""
    if not dev_file:
        return []
    from raggen.corpus.qa import read_qa

    dev = read_qa(dev_file, s3_options=s3_options)
    match_ids = not positional_ids(dev) and not positional_ids(train_items)
    seen = seen_in(train_items, dev, match_ids=match_ids)
    if dev and len(seen) == len(dev):
        raise ConfigError(
            f"train.dev_file: {dev_file}: all {len(dev)} of its questions are also training questions "
            "(train.train_file), so the in-run eval has nothing held out to score; name a dev file of other "
            "questions, or set train.eval_every: 0"
        )
    overlap = seen_in(train_items, dev[:limit], match_ids=match_ids) if limit else seen
    if overlap:
        log.warning(
            "train.dev_file %s: %d of the scored questions are also training questions (%s): they are left "
            "out of the in-run eval",
            dev_file,
            len(overlap),
            ", ".join(overlap[:5]),
        )
    return overlap
