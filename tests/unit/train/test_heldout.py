"""Held-out means held out: the questions scored as held-out (the training tests' loss, a run's
dev evaluation) are never among the questions trained on."""

from __future__ import annotations

import logging

import pytest

from raggen.corpus.qa import QAExample
from raggen.corpus.world import WorldConfig, build_world, write_world
from raggen.errors import ConfigError
from raggen.train.heldout import check_dev_file, check_heldout, positional_ids, seen_in, split_heldout


def _keys(examples):
    return {e.id for e in examples}, {e.question.lower() for e in examples}


def test_the_training_tests_heldout_split_is_disjoint_from_their_training_file():
    """The split tests/integration/test_train_ray.py trains and scores on (same world, same sizes)."""
    world = build_world(WorldConfig(num_entities=30, seed=0))
    train, heldout = split_heldout(world.train, 48, 8)
    assert len(train) == 48 and len(heldout) == 8
    (train_ids, train_qs), (held_ids, held_qs) = _keys(train), _keys(heldout)
    assert not train_ids & held_ids and not train_qs & held_qs
    assert seen_in(train, heldout) == []
    check_heldout(train, heldout)
    # what the tests used to do: score a subset of the training file
    with pytest.raises(ConfigError, match="8 question.s. are also training questions"):
        check_heldout(train, world.train[:8])


def test_the_worlds_dev_and_test_splits_are_disjoint_from_train():
    world = build_world(WorldConfig(num_entities=30, seed=0))
    for split in (world.dev, world.test):
        assert split and seen_in(world.train, split) == []


def test_a_repeated_question_is_never_scored_as_heldout():
    rows = [QAExample(f"q{i}", f"Where is mill {i}?", [str(i)], []) for i in range(6)]
    rows.append(QAExample("q-dup", "where is MILL 1", ["1"], []))  # q1 again: other id, case, punctuation
    rows.append(QAExample("q0", "A new question with a reused id?", ["x"], []))
    assert seen_in(rows[:4], rows[4:]) == ["q-dup", "q0"]
    train, heldout = split_heldout(rows, 4, 2)
    assert [e.id for e in heldout] == ["q4", "q5"]
    with pytest.raises(ConfigError, match="only 2 of the 3 held-out"):
        split_heldout(rows, 4, 3)
    dicts = [{"id": e.id, "question": e.question} for e in rows[:4]]  # Ray Data rows work too
    assert seen_in(dicts, rows[4:]) == ["q-dup", "q0"]


def test_a_dev_file_sharing_training_questions_is_reported(tmp_path, caplog):
    files = write_world(tmp_path / "world", WorldConfig(num_entities=30, seed=0))
    world = build_world(WorldConfig(num_entities=30, seed=0))
    items = [{"id": e.id, "question": e.question} for e in world.train]
    assert check_dev_file(items, str(files.dev_jsonl), 8) == []
    with caplog.at_level(logging.WARNING, logger="raggen.train.heldout"):
        overlap = check_dev_file(items[:-1], str(files.train_jsonl), 5)  # one question of the file is not trained on
    assert len(overlap) == 5 and "also training questions" in caplog.text


def test_a_dev_file_of_training_questions_only_is_refused(tmp_path):
    """train.dev_file = train.train_file (a user's first try): the in-run eval would score nothing,
    so the driver says so, naming the field, before Ray starts (was: a ValueError in the Train worker
    at the first eval, after the first steps)."""
    files = write_world(tmp_path / "world", WorldConfig(num_entities=30, seed=0))
    world = build_world(WorldConfig(num_entities=30, seed=0))
    items = [{"id": e.id, "question": e.question} for e in world.train]
    with pytest.raises(ConfigError, match=r"train.dev_file: .*train.jsonl: all \d+ of its questions .*eval_every: 0"):
        check_dev_file(items, str(files.train_jsonl), None)
    with pytest.raises(ConfigError, match=f"all {len(world.train)} of its questions"):
        check_dev_file(items, str(files.train_jsonl), 5)  # its first 5 are scored, and so is every other
    assert check_dev_file(items[:-1], str(files.train_jsonl), None) == [e.id for e in world.train[:-1]]


def test_the_in_run_eval_leaves_out_dev_questions_that_are_trained_on(tmp_path):
    """The loop's dev subset skips the ids the driver found in the training file, then takes
    ``eval_examples``: a dev file that repeats training questions still gets held-out scores."""
    from raggen.corpus.qa import read_qa
    from raggen.index.settings import SearchSettings
    from raggen.models.build import ModelSpec
    from raggen.train.job import IndexTarget, TrainJob
    from raggen.train.loop import _dev_examples
    from raggen.train.settings import LoopSettings, StepSettings

    files = write_world(tmp_path / "world", WorldConfig(num_entities=30, seed=0))
    dev = read_qa(str(files.dev_jsonl))
    train = read_qa(str(files.train_jsonl))
    mixed = tmp_path / "mixed.jsonl"  # two training questions first, then the real dev set
    mixed.write_text("".join(open(files.train_jsonl).readlines()[:2]) + open(files.dev_jsonl).read())
    items = [{"id": e.id, "question": e.question} for e in train]
    excluded = tuple(check_dev_file(items, str(mixed), None))
    assert excluded == (train[0].id, train[1].id)
    job = TrainJob(
        loop=LoopSettings(eval_examples=4),
        step=StepSettings(),
        models=ModelSpec(),
        index=IndexTarget(uri="unused", search=SearchSettings()),
        dev_file=str(mixed),
    )
    assert [e.id for e in _dev_examples(job.replace(dev_exclude_ids=excluded))] == [e.id for e in dev[:4]]
    assert [e.id for e in _dev_examples(job)][:2] == [train[0].id, train[1].id]


def test_dpr_csv_row_numbers_are_not_identities(tmp_path):
    """A DPR ``.qa.csv`` (or a JSONL without ids) numbers its rows 0, 1, ...: a train and a dev CSV of
    different questions share every row number, and must not be taken for the same questions
    (was: all of dev 'seen', the in-run eval left with nothing). A question in both still is."""
    from raggen.corpus.qa import read_qa
    from raggen.train.trainer import qa_items

    train_csv, dev_csv, dev_jsonl = tmp_path / "train.qa.csv", tmp_path / "dev.qa.csv", tmp_path / "dev.jsonl"
    train_csv.write_text("".join(f"Where is mill {i}?\t['{i}']\n" for i in range(6)))
    dev_csv.write_text("Who built the bridge?\t['Ann']\nWHERE is mill 4\t['4']\nWhen did it open?\t['1900']\n")
    items = qa_items(str(train_csv))
    assert [e.id for e in read_qa(str(dev_csv))] == ["0", "1", "2"]  # the row numbers train also has
    assert check_dev_file(items, str(dev_csv), None) == ["1"]  # by question only
    dev_jsonl.write_text('{"id": "3", "question": "Who built the bridge?", "answers": ["Ann"]}\n')
    assert check_dev_file(items, str(dev_jsonl), None) == []  # train's ids are its row numbers
    assert seen_in(items, read_qa(str(dev_jsonl))) == ["3"]  # ids compared: what files with real ids get
    no_ids = tmp_path / "no-ids.jsonl"  # a JSONL without ids is numbered by row too
    no_ids.write_text(
        '{"question": "Who built the bridge?", "answers": ["Ann"]}\n{"question": "Q2?", "answers": ["x"]}\n'
    )
    assert positional_ids(read_qa(str(no_ids))) and check_dev_file(items, str(no_ids), None) == []
