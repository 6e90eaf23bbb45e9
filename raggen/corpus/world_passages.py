"""Entities of the generated world and the passages that state their facts.

Every fact is stated in exactly one ~100-word passage; the rest is distractor sentences that
mention other entities and reuse the attribute vocabulary without stating a fact ("her brother
once tried to learn the oboe").
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field

from raggen.corpus import world_templates as T
from raggen.corpus.world_names import NoValue

FILLER_YEARS = {"person": (1790, 1999), "town": (1050, 1990), "company": (1780, 1999)}
_FORMATTER = string.Formatter()


@dataclass
class Entity:
    id: str
    kind: str  # person | town | company
    name: str
    pronoun: str  # key of world_templates.PRONOUNS
    attributes: dict[str, str]  # attribute -> value (version 1)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def draw_value(vtype: str, rng: random.Random, names, exclude: set[str], years: tuple[int, int] = (1050, 1999)) -> str:
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
    raise NoValue(vtype)


@dataclass
class _Sentence:
    template: str
    slots: dict[str, str]
    attribute: str | None = None  # set for the sentence that states a fact


@dataclass
class PassageSpec:
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
        value = draw_value(key, rng, names, used, FILLER_YEARS[entity.kind])
        used.add(value)
        slots[key] = value
        slots[f"a_{key}"] = _article(value)
    return _Sentence(template, slots)


def _count_words(s: _Sentence, values: dict[str, str]) -> int:
    return len(_render_sentence(s, values).split())


def build_passage(
    pid: str, entity: Entity, attributes: list[str], first: bool, rng: random.Random, names, target_words: int
) -> PassageSpec:
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
        except NoValue:  # a tiny world has run out of, say, towns: use another sentence
            continue
        body.append(s)
        words += _count_words(s, values)
    rng.shuffle(body)
    return PassageSpec(pid, entity, [head, *body])


def count_mentions(value: str, text: str) -> int:
    """How often ``value`` occurs in ``text`` as whole words (not inside a longer word)."""
    return len(re.findall(rf"(?<!\w){re.escape(value)}(?!\w)", text))


def new_entity(eid: str, kind: str, name: str, rng: random.Random, names) -> Entity:
    pronoun = rng.choice(("she", "he")) if kind == "person" else kind
    attributes: dict[str, str] = {}
    for attribute, vtype in T.ATTRIBUTES[kind].items():
        attributes[attribute] = draw_value(
            vtype, rng, names, set(attributes.values()) | {name}, T.YEAR_RANGES.get(attribute, FILLER_YEARS[kind])
        )
    return Entity(eid, kind, name, pronoun, attributes)


def entity_passages(
    entity: Entity, rng: random.Random, names, facts_per_passage: int, target_words: int
) -> list[PassageSpec]:
    """The entity's facts spread over passages; each fact's value occurs once in its passage."""
    attributes = list(entity.attributes)
    rng.shuffle(attributes)
    groups = [attributes[i : i + facts_per_passage] for i in range(0, len(attributes), facts_per_passage)]
    specs = []
    for k, group in enumerate(groups):
        for _ in range(50):
            spec = build_passage(f"{entity.id}-{k}", entity, group, k == 0, rng, names, target_words)
            text = spec.render(entity.attributes)
            if all(count_mentions(entity.attributes[a], text) == 1 for a in group):
                break
        else:
            raise RuntimeError(f"could not state the facts of {entity.id} unambiguously")
        specs.append(spec)
    return specs


def question_for(entity: Entity, attribute: str, rng: random.Random) -> str:
    return rng.choice(T.QUESTION_TEMPLATES[attribute]).format(name=entity.name)
