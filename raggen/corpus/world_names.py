"""Invented names of the generated world: people, towns, companies, rivers and provinces.

Names are built from syllables (MiniLM's WordPiece splits them into sub-words) and many share a
part with others (first names, surnames, town and company stems), so they make near-miss
distractors. A fixed world draws from :class:`WorldNames`; reader pre-training invents fresh
ones on demand (:class:`FreshNames`).
"""

from __future__ import annotations

import random
from collections import OrderedDict

from raggen.corpus import world_templates as T

KIND_SHARES = {"town": 0.2, "company": 0.25}  # the rest are people
NAME_KINDS = ("person", "town", "company", "river", "province")


class NoValue(Exception):
    """Every value of a type is already used in this passage (only in tiny worlds)."""


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


class WorldNames:
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
            raise NoValue(kind)
        return rng.choice(rest)


class FreshNames:
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
        """Like ``WorldNames.draw``; invents with its own generator (the stream's), not ``rng``."""
        while True:
            name = self._invent(kind)
            if name not in self.recent and name not in exclude:
                self.recent[name] = None
                if len(self.recent) > self.window:
                    self.recent.popitem(last=False)
                return name


def invent_world_names(num_entities: int, rng: random.Random) -> tuple[dict[str, list[str]], WorldNames]:
    """Entity names by kind, built so that many names share a part with others."""
    n_towns = max(4, round(num_entities * KIND_SHARES["town"]))
    n_companies = max(4, round(num_entities * KIND_SHARES["company"]))
    n_people = num_entities - n_towns - n_companies
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
    return by_kind, WorldNames(by_kind, rivers, provinces)


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
