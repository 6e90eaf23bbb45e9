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
import re
import string
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from raggen.corpus import world_templates as T
from raggen.corpus.qa import QAExample, write_qa_csv, write_qa_jsonl
from raggen.corpus.readers import atomic_writer, iter_jsonl_objects, write_passages
from raggen.errors import ConfigError, DataError

SPLITS = ("train", "dev", "test")
KINDS = ("person", "town", "company")
KIND_SHARES = {"town": 0.2, "company": 0.25}  # the rest are people
NAME_KINDS = ("person", "town", "company", "river", "province")
FILLER_YEARS = {"person": (1790, 1999), "town": (1050, 1990), "company": (1780, 1999)}
TITLE_SEP = " . "  # as raggen.models.retriever.passage_text joins title and text
_FORMATTER = string.Formatter()


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
class Entity:
    id: str
    kind: str  # person | town | company
    name: str
    pronoun: str  # key of world_templates.PRONOUNS
    attributes: dict[str, str]  # attribute -> value (version 1)


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


# --------------------------------------------------------------------------- names


def _word(rng: random.Random, syllables: int, coda: bool = True) -> str:
    """An invented word: a first syllable, ``syllables - 1`` inner ones, maybe a closing consonant."""
    w = rng.choice(T.ONSETS_FIRST) + rng.choice(T.VOWELS_FIRST)
    for _ in range(syllables - 1):
        w += rng.choice(T.ONSETS_INNER) + rng.choice(T.VOWELS_INNER)
    if coda:
        w += rng.choice(T.CODAS)
    return w.capitalize()


class _UniqueWords:
    """Hands out invented words, each to one role only (a surname is never also a town)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def take(self, make) -> str:
        for _ in range(1000):
            w = make(self.rng)
            if w.lower() not in self.used:
                self.used.add(w.lower())
                return w
        raise RuntimeError("ran out of invented words; widen the syllable inventory")

    def families(self, make, n: int, size: int = 2) -> list[str]:
        """``n`` words in families of ``size`` look-alikes (Marsk, Marska): near-miss distractors."""
        out: list[str] = []
        while len(out) < n:
            stem = self.take(make)
            out.append(stem)
            for ending in self.rng.sample(T.NAME_ENDINGS, k=size - 1):
                if len(out) < n and (stem + ending).lower() not in self.used:
                    self.used.add((stem + ending).lower())
                    out.append(stem + ending)
        return out


def _town_name(stem: str, rng: random.Random) -> str:
    return stem + rng.choice(T.TOWN_SUFFIXES)


class _WorldNames:
    """Names of a fixed world: references point at real entities; rivers and provinces are shared."""

    def __init__(self, by_kind: dict[str, list[str]], rivers: list[str], provinces: list[str]):
        self.lists = {**by_kind, "river": rivers, "province": provinces}

    def draw(self, kind: str, rng: random.Random, exclude: set[str]) -> str:
        options = self.lists[kind]
        for _ in range(50):
            name = rng.choice(options)
            if name not in exclude:
                return name
        rest = [n for n in options if n not in exclude]
        if not rest:
            raise _NoValue(kind)
        return rng.choice(rest)


class _FreshNames:
    """Names invented on demand, never repeating within a long window (for reader pre-training)."""

    def __init__(self, rng: random.Random, window: int = 200_000):
        self.rng = rng
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.window = window

    def _invent(self, kind: str) -> str:
        r = self.rng
        if kind == "person":
            return f"{_word(r, 2, coda=r.random() < 0.5)} {_word(r, 2)}"
        if kind == "town":
            return _town_name(_word(r, r.choice((1, 2))), r) if r.random() < 0.7 else _word(r, 3)
        if kind == "company":
            return f"{_word(r, 2)} {r.choice(T.COMPANY_KINDS)}"
        return _word(r, 2 if kind == "river" else 3)

    def draw(self, kind: str, rng: random.Random, exclude: set[str]) -> str:
        """Like ``_WorldNames.draw``; invents with its own generator (the stream's), not ``rng``."""
        while True:
            name = self._invent(kind)
            if name not in self.recent and name not in exclude:
                self.recent[name] = None
                if len(self.recent) > self.window:
                    self.recent.popitem(last=False)
                return name


def _world_names(cfg: WorldConfig, rng: random.Random) -> tuple[dict[str, list[str]], _WorldNames]:
    """Entity names by kind, built so that many names share a part with others."""
    n_towns = max(4, round(cfg.num_entities * KIND_SHARES["town"]))
    n_companies = max(4, round(cfg.num_entities * KIND_SHARES["company"]))
    n_people = cfg.num_entities - n_towns - n_companies
    words = _UniqueWords(rng)
    firsts = words.families(lambda r: _word(r, 2, coda=r.random() < 0.5), max(6, n_people // 5))
    surnames = words.families(lambda r: _word(r, 2), max(6, n_people // 4))
    people = _distinct(rng, n_people, lambda: f"{rng.choice(firsts)} {rng.choice(surnames)}")
    town_stems = [words.take(lambda r: _word(r, r.choice((1, 2)))) for _ in range(max(2, n_towns // 2))]
    towns = _distinct(rng, n_towns, lambda: _town_name(rng.choice(town_stems), rng))
    company_stems = [words.take(lambda r: _word(r, 2)) for _ in range(max(2, n_companies // 3))]
    company_stems += rng.sample(surnames, k=min(len(surnames), max(1, len(company_stems) // 3)))
    companies = _distinct(rng, n_companies, lambda: f"{rng.choice(company_stems)} {rng.choice(T.COMPANY_KINDS)}")
    rivers = [words.take(lambda r: _word(r, 2)) for _ in range(max(4, n_towns // 4))]
    provinces = [words.take(lambda r: _word(r, 3)) for _ in range(max(3, n_towns // 12))]
    by_kind = {"person": people, "town": towns, "company": companies}
    return by_kind, _WorldNames(by_kind, rivers, provinces)


def _distinct(rng: random.Random, n: int, make) -> list[str]:
    out: dict[str, None] = {}
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        out[make()] = None
    if len(out) < n:
        raise RuntimeError(f"could not invent {n} distinct names")
    return list(out)


# --------------------------------------------------------------------------- values and sentences


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


class _NoValue(Exception):
    """Every value of a type is already used in this passage (only in tiny worlds)."""


def _draw_value(vtype: str, rng: random.Random, names, exclude: set[str], years: tuple[int, int] = (1050, 1999)) -> str:
    """A value of a type ("year" within ``years``, a pool, or a name kind) not in ``exclude``."""
    for _ in range(200):
        if vtype == "year":
            value = str(rng.randint(*years))
        elif vtype in T.POOLS:
            value = rng.choice(T.POOLS[vtype])
        else:
            value = names.draw(vtype, rng, exclude)
        if value not in exclude:
            return value
    raise _NoValue(vtype)


@dataclass
class _Sentence:
    template: str
    slots: dict[str, str]
    attribute: str | None = None  # set for the sentence that states a fact


@dataclass
class _PassageSpec:
    id: str
    entity: Entity
    sentences: list[_Sentence] = field(default_factory=list)

    def render(self, values: dict[str, str]) -> str:
        """The passage text with the given attribute values (v1 or v2) in its fact sentences."""
        return " ".join(_render_sentence(s, values) for s in self.sentences)


def _render_sentence(s: _Sentence, values: dict[str, str]) -> str:
    if s.attribute is None:
        return s.template.format(**s.slots)
    v = values[s.attribute]
    return s.template.format(**s.slots, v=v, a=_article(v))


def _subject_slots(entity: Entity, rng: random.Random) -> dict[str, str]:
    """Subject and possessive forms for one sentence: the name, or a pronoun half the time."""
    subj_pron, poss_pron = T.PRONOUNS[entity.pronoun]
    if rng.random() < 0.5:
        subj, poss = entity.name, f"{entity.name}'s"
    else:
        subj, poss = subj_pron, poss_pron
    return {
        "name": entity.name,
        "subj": subj,
        "Subj": subj[0].upper() + subj[1:],
        "poss": poss,
        "Poss": poss[0].upper() + poss[1:],
        "pron": poss_pron,
        "Pron": poss_pron.capitalize(),
    }


def _filler(entity: Entity, template: str, rng: random.Random, names, used: set[str]) -> _Sentence:
    slots = _subject_slots(entity, rng)
    for _, key, _, _ in _FORMATTER.parse(template):
        if key is None or key in slots or key.startswith("a_"):
            continue
        value = _draw_value(key, rng, names, used, FILLER_YEARS[entity.kind])
        used.add(value)
        slots[key] = value
        slots[f"a_{key}"] = _article(value)
    return _Sentence(template, slots)


def _count_words(s: _Sentence, values: dict[str, str]) -> int:
    return len(_render_sentence(s, values).split())


def _build_passage(
    pid: str, entity: Entity, attributes: list[str], first: bool, rng: random.Random, names, target_words: int
) -> _PassageSpec:
    """One passage: an opening, the facts, distractor sentences up to ~target_words, shuffled."""
    values = entity.attributes
    used = set(values.values()) | {entity.name}
    opening = T.INTRO_TEMPLATES if first else T.CONTINUATION_TEMPLATES
    head = _Sentence(rng.choice(opening[entity.kind]), {"name": entity.name})
    body = [_Sentence(rng.choice(T.FACT_TEMPLATES[a]), _subject_slots(entity, rng), a) for a in attributes]
    words = sum(_count_words(s, values) for s in [head, *body])
    fillers = rng.sample(T.FILLER_TEMPLATES[entity.kind], k=len(T.FILLER_TEMPLATES[entity.kind]))
    for template in fillers:
        if words >= target_words - 6:
            break
        try:
            s = _filler(entity, template, rng, names, used)
        except _NoValue:  # a tiny world has run out of, say, towns: use another sentence
            continue
        body.append(s)
        words += _count_words(s, values)
    rng.shuffle(body)
    return _PassageSpec(pid, entity, [head, *body])


def count_mentions(value: str, text: str) -> int:
    """How often ``value`` occurs in ``text`` as whole words (not inside a longer word)."""
    return len(re.findall(rf"(?<!\w){re.escape(value)}(?!\w)", text))


def _new_entity(eid: str, kind: str, name: str, rng: random.Random, names) -> Entity:
    pronoun = rng.choice(("she", "he")) if kind == "person" else kind
    attributes: dict[str, str] = {}
    for attribute, vtype in T.ATTRIBUTES[kind].items():
        attributes[attribute] = _draw_value(
            vtype, rng, names, set(attributes.values()) | {name}, T.YEAR_RANGES.get(attribute, FILLER_YEARS[kind])
        )
    return Entity(eid, kind, name, pronoun, attributes)


def _entity_passages(
    entity: Entity, rng: random.Random, names, facts_per_passage: int, target_words: int
) -> list[_PassageSpec]:
    """The entity's facts spread over passages; each fact's value occurs once in its passage."""
    attributes = list(entity.attributes)
    rng.shuffle(attributes)
    groups = [attributes[i : i + facts_per_passage] for i in range(0, len(attributes), facts_per_passage)]
    specs = []
    for k, group in enumerate(groups):
        for _ in range(50):
            spec = _build_passage(f"{entity.id}-{k}", entity, group, k == 0, rng, names, target_words)
            text = spec.render(entity.attributes)
            if all(count_mentions(entity.attributes[a], text) == 1 for a in group):
                break
        else:
            raise RuntimeError(f"could not state the facts of {entity.id} unambiguously")
        specs.append(spec)
    return specs


def _question(entity: Entity, attribute: str, rng: random.Random) -> str:
    return rng.choice(T.QUESTION_TEMPLATES[attribute]).format(name=entity.name)


# --------------------------------------------------------------------------- the world


def build_world(cfg: WorldConfig) -> World:
    """The whole world in memory; the same config always gives the same world."""
    rng = random.Random(cfg.seed)
    by_kind, names = _world_names(cfg, rng)
    width = max(5, len(str(cfg.num_entities - 1)))
    entities: list[Entity] = []
    for kind in KINDS:
        for name in by_kind[kind]:
            entities.append(_new_entity(f"e{len(entities):0{width}d}", kind, name, rng, names))
    specs: list[_PassageSpec] = []
    facts: list[Fact] = []
    for e in entities:
        for spec in _entity_passages(e, rng, names, cfg.facts_per_passage, cfg.passage_words):
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
                            _question(e, s.attribute, rng),
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
    facts: list[Fact], specs: list[_PassageSpec], texts_v1: dict[str, str], cfg: WorldConfig, rng: random.Random, names
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


def _new_value(f: Fact, spec: _PassageSpec, text_v1: str, rng: random.Random, names) -> str | None:
    """A value for the fact that its v1 passage never mentions, so v1 and v2 answers differ."""
    vtype = T.ATTRIBUTES[spec.entity.kind][f.attribute]
    exclude = {f.value, spec.entity.name, *spec.entity.attributes.values()}
    for _ in range(100):
        try:
            new = _draw_value(vtype, rng, names, exclude, T.YEAR_RANGES.get(f.attribute, (1050, 1999)))
        except _NoValue:
            return None
        if count_mentions(new, text_v1) == 0:
            return new
        exclude.add(new)
    return None


def _passage_frame(specs: list[_PassageSpec], texts: dict[str, str]) -> pd.DataFrame:
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
    names = _FreshNames(rng)
    weights = [1.0 - sum(KIND_SHARES.values()), KIND_SHARES["town"], KIND_SHARES["company"]]
    n = 0
    while True:
        kind = rng.choices(KINDS, weights=weights)[0]
        entity = _new_entity(f"r{n}", kind, names.draw(kind, rng, set()), rng, names)
        n += 1
        attributes = rng.sample(list(entity.attributes), k=min(facts_per_passage, len(entity.attributes)))
        for _ in range(50):
            spec = _build_passage(entity.id, entity, attributes, rng.random() < 0.5, rng, names, passage_words)
            text = spec.render(entity.attributes)
            if all(count_mentions(entity.attributes[a], text) == 1 for a in attributes):
                break
        else:
            continue
        asked = rng.choice(attributes)
        yield _question(entity, asked, rng), f"{entity.name}{TITLE_SEP}{text}", entity.attributes[asked]
