"""A generated world of fictional people, towns and companies whose facts only retrieval can tell.

Why: a RAG system needs a knowledge base where closed-book guessing fails. Names are invented from
syllables (MiniLM's WordPiece splits them into sub-words), attribute values are drawn at random,
and every fact is stated in exactly one ~100-word passage. Distractors come for free: people share
first names and surnames, towns share stems, companies share stems with each other and with
surnames, passages mention other entities and reuse the attribute vocabulary in sentences that
are not facts ("her brother once tried to learn the oboe"). Questions use other wording than the
passages, and their answer is a span of the gold passage.

Version 2 of the world changes a fraction of the facts (same passage ids, new values), so that an
index hot-swap visibly changes the served answers.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from raggen.corpus import world_templates as T
from raggen.corpus.qa import QAExample, write_qa_csv, write_qa_jsonl
from raggen.corpus.readers import atomic_writer, write_passages
from raggen.corpus.text_files import iter_jsonl_objects
from raggen.corpus.world_names import KIND_SHARES, FreshNames, NoValue, invent_world_names
from raggen.corpus.world_passages import (
    Entity,
    PassageSpec,
    build_passage,
    count_mentions,
    draw_value,
    entity_passages,
    new_entity,
    question_for,
)
from raggen.errors import ConfigError, DataError

SPLITS = ("train", "dev", "test")
KINDS = ("person", "town", "company")
TITLE_SEP = " . "  # as raggen.models.retriever.passage_text joins title and text


@dataclass
class WorldConfig:
    """How big the world is, how it is split, and how much of it changes in version 2."""

    num_entities: int = 2000
    seed: int = 0
    changed_fraction: float = 0.1  # fraction of all facts whose value differs in v2
    dev_fraction: float = 0.1  # fraction of facts asked about only in dev
    test_fraction: float = 0.1  # fraction of facts asked about only in test
    facts_per_passage: int = 3  # an entity's facts are spread over passages of this many facts
    passage_words: int = 100  # passages are filled with distractor sentences up to about this

    def __post_init__(self) -> None:
        if self.num_entities < 10:
            raise ConfigError(f"world.num_entities must be >= 10, got {self.num_entities}")
        for name in ("changed_fraction", "dev_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"world.{name} must be in [0, 1], got {value}")
        if self.dev_fraction + self.test_fraction >= 1.0:
            raise ConfigError("world.dev_fraction + world.test_fraction must be < 1 (train needs facts)")
        if not 1 <= self.facts_per_passage <= 6:
            raise ConfigError(f"world.facts_per_passage must be in [1, 6], got {self.facts_per_passage}")
        if not 20 <= self.passage_words <= 400:
            raise ConfigError(f"world.passage_words must be in [20, 400], got {self.passage_words}")


@dataclass
class Fact:
    """One (entity, attribute) pair: stated in one passage, asked about in one split."""

    id: str  # also the id of its question: "{entity_id}.{attribute}"
    entity_id: str
    attribute: str
    value: str  # version 1
    value_v2: str  # equal to value unless the fact changes
    passage_id: str
    split: str
    question: str

    @property
    def changed(self) -> bool:
        return self.value != self.value_v2


@dataclass
class ChangedFact:
    """A fact whose answer differs between the v1 and v2 passages (one line of changed_v2.jsonl)."""

    id: str
    question: str
    answers_v1: list[str]
    answers_v2: list[str]
    gold_passage_ids: list[str]
    split: str


@dataclass
class World:
    config: WorldConfig
    entities: list[Entity]
    facts: list[Fact]
    passages_v1: pd.DataFrame  # id, text, title
    passages_v2: pd.DataFrame  # same ids; changed facts carry their new values
    train: list[QAExample]
    dev: list[QAExample]
    test: list[QAExample]
    changed: list[ChangedFact]

    def split(self, name: str) -> list[QAExample]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def counts(self) -> dict[str, int]:
        kinds = Counter(e.kind for e in self.entities)
        words = self.passages_v1["text"].str.split().str.len()
        return {
            "entities": len(self.entities),
            "people": kinds["person"],
            "towns": kinds["town"],
            "companies": kinds["company"],
            "passages": len(self.passages_v1),
            "facts": len(self.facts),
            "train": len(self.train),
            "dev": len(self.dev),
            "test": len(self.test),
            "changed": len(self.changed),
            "mean_passage_words": round(float(words.mean()), 1),
        }


@dataclass
class WorldFiles:
    """Where ``write_world`` put everything."""

    out_dir: Path
    passages_v1: Path
    passages_v2: Path
    train_csv: Path
    dev_csv: Path
    test_csv: Path
    train_jsonl: Path
    dev_jsonl: Path
    test_jsonl: Path
    changed: Path
    world_json: Path

    def qa_csv(self, split: str) -> Path:
        return getattr(self, f"{split}_csv")

    def qa_jsonl(self, split: str) -> Path:
        return getattr(self, f"{split}_jsonl")


def build_world(cfg: WorldConfig) -> World:
    """The whole world in memory; the same config always gives the same world."""
    rng = random.Random(cfg.seed)
    by_kind, names = invent_world_names(cfg.num_entities, rng)
    width = max(5, len(str(cfg.num_entities - 1)))
    entities: list[Entity] = []
    for kind in KINDS:
        for name in by_kind[kind]:
            entities.append(new_entity(f"e{len(entities):0{width}d}", kind, name, rng, names))
    specs: list[PassageSpec] = []
    facts: list[Fact] = []
    for e in entities:
        for spec in entity_passages(e, rng, names, cfg.facts_per_passage, cfg.passage_words):
            specs.append(spec)
            for s in spec.sentences:
                if s.attribute is not None:
                    facts.append(
                        Fact(
                            f"{e.id}.{s.attribute}",
                            e.id,
                            s.attribute,
                            e.attributes[s.attribute],
                            e.attributes[s.attribute],
                            spec.id,
                            "train",
                            question_for(e, s.attribute, rng),
                        )
                    )
    facts.sort(key=lambda f: f.id)
    _assign_splits(facts, cfg, rng)
    texts_v1 = {s.id: s.render(s.entity.attributes) for s in specs}
    texts_v2 = _change_facts(facts, specs, texts_v1, cfg, rng, names)
    return World(
        config=cfg,
        entities=entities,
        facts=facts,
        passages_v1=_passage_frame(specs, texts_v1),
        passages_v2=_passage_frame(specs, texts_v2),
        **{split: [_qa(f) for f in facts if f.split == split] for split in SPLITS},
        changed=[
            ChangedFact(f.id, f.question, [f.value], [f.value_v2], [f.passage_id], f.split) for f in facts if f.changed
        ],
    )


def _assign_splits(facts: list[Fact], cfg: WorldConfig, rng: random.Random) -> None:
    order = list(range(len(facts)))
    rng.shuffle(order)
    n_test = round(cfg.test_fraction * len(facts))
    n_dev = round(cfg.dev_fraction * len(facts))
    for rank, i in enumerate(order):
        facts[i].split = "test" if rank < n_test else "dev" if rank < n_test + n_dev else "train"


def _change_facts(
    facts: list[Fact], specs: list[PassageSpec], texts_v1: dict[str, str], cfg: WorldConfig, rng: random.Random, names
) -> dict[str, str]:
    """Give ``changed_fraction`` of the facts a new value; return the v2 passage texts."""
    by_id = {s.id: s for s in specs}
    wanted = round(cfg.changed_fraction * len(facts))
    overrides: dict[str, dict[str, str]] = {}
    for i in rng.sample(range(len(facts)), k=len(facts)):
        if wanted == 0:
            break
        f = facts[i]
        spec = by_id[f.passage_id]
        new = _new_value(f, spec, texts_v1[spec.id], rng, names)
        if new is None:  # no unused value left (tiny worlds): change another fact instead
            continue
        f.value_v2 = new
        overrides.setdefault(spec.id, {})[f.attribute] = new
        wanted -= 1
    texts_v2 = dict(texts_v1)
    for pid, changes in overrides.items():
        spec = by_id[pid]
        texts_v2[pid] = spec.render({**spec.entity.attributes, **changes})
    return texts_v2


def _new_value(f: Fact, spec: PassageSpec, text_v1: str, rng: random.Random, names) -> str | None:
    """A value for the fact that its v1 passage never mentions, so v1 and v2 answers differ."""
    vtype = T.ATTRIBUTES[spec.entity.kind][f.attribute]
    exclude = {f.value, spec.entity.name, *spec.entity.attributes.values()}
    for _ in range(100):
        try:
            new = draw_value(vtype, rng, names, exclude, T.YEAR_RANGES.get(f.attribute, (1050, 1999)))
        except NoValue:
            return None
        if count_mentions(new, text_v1) == 0:
            return new
        exclude.add(new)
    return None


def _passage_frame(specs: list[PassageSpec], texts: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"id": [s.id for s in specs], "text": [texts[s.id] for s in specs], "title": [s.entity.name for s in specs]},
        columns=["id", "text", "title"],
    )


def _qa(f: Fact) -> QAExample:
    return QAExample(id=f.id, question=f.question, answers=[f.value], gold_passage_ids=[f.passage_id])


def write_world(out_dir: str | Path, cfg: WorldConfig) -> WorldFiles:
    """Build the world and write passages (v1, v2), QA splits (.qa.csv and .jsonl), changes, summary."""
    out = Path(out_dir)
    world = build_world(cfg)
    files = WorldFiles(
        out_dir=out,
        passages_v1=out / "passages.tsv",
        passages_v2=out / "passages_v2.tsv",
        **{f"{s}_csv": out / f"{s}.qa.csv" for s in SPLITS},
        **{f"{s}_jsonl": out / f"{s}.jsonl" for s in SPLITS},
        changed=out / "changed_v2.jsonl",
        world_json=out / "world.json",
    )
    write_passages(files.passages_v1, world.passages_v1)
    write_passages(files.passages_v2, world.passages_v2)
    for split in SPLITS:
        write_qa_csv(files.qa_csv(split), world.split(split))
        write_qa_jsonl(files.qa_jsonl(split), world.split(split))
    with atomic_writer(files.changed) as f:
        for c in world.changed:
            f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
    summary = {
        "format": "raggen-world/1",
        "config": asdict(cfg),
        "counts": world.counts(),
        "files": {k: v.name for k, v in asdict(files).items() if k != "out_dir"},
    }
    with atomic_writer(files.world_json) as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return files


def read_changed_facts(path: str | Path) -> list[ChangedFact]:
    """Read ``changed_v2.jsonl`` back; a line that lacks a field is a DataError naming it."""
    out = []
    for lineno, obj in iter_jsonl_objects(path):
        try:
            out.append(
                ChangedFact(
                    id=str(obj["id"]),
                    question=obj["question"],
                    answers_v1=list(obj["answers_v1"]),
                    answers_v2=list(obj["answers_v2"]),
                    gold_passage_ids=[str(g) for g in obj["gold_passage_ids"]],
                    split=obj.get("split", ""),
                )
            )
        except KeyError as e:
            raise DataError(f"{path}: line {lineno}: missing column {e.args[0]!r}") from None
    return out


# --------------------------------------------------------------------------- reader pre-training


def reader_examples(seed: int, facts_per_passage: int = 3, passage_words: int = 100) -> Iterator[tuple[str, str, str]]:
    """Endless (question, passage, answer) triples, each about a newly invented entity.

    The passage is shown as ``title . text`` (as ``passage_text`` joins them); the answer is a
    span of it. Names and values are fresh every time, so a reader trained on this stream learns
    to find and copy the span, and cannot memorise facts of the world built by ``build_world``.
    """
    rng = random.Random(f"raggen-reader-{seed}")
    names = FreshNames(rng)
    weights = [1.0 - sum(KIND_SHARES.values()), KIND_SHARES["town"], KIND_SHARES["company"]]
    n = 0
    while True:
        kind = rng.choices(KINDS, weights=weights)[0]
        entity = new_entity(f"r{n}", kind, names.draw(kind, rng, set()), rng, names)
        n += 1
        attributes = rng.sample(list(entity.attributes), k=min(facts_per_passage, len(entity.attributes)))
        for _ in range(50):
            spec = build_passage(entity.id, entity, attributes, rng.random() < 0.5, rng, names, passage_words)
            text = spec.render(entity.attributes)
            if all(count_mentions(entity.attributes[a], text) == 1 for a in attributes):
                break
        else:
            continue
        asked = rng.choice(attributes)
        yield question_for(entity, asked, rng), f"{entity.name}{TITLE_SEP}{text}", entity.attributes[asked]
