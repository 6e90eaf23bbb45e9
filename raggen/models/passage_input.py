"""How passages become encoder input: ``title . text`` or DPR's (title, text) sentence pair.

No torch at import: the index build's tokenise tasks call this with ``return_tensors="np"`` and
never load the model code.
"""

from __future__ import annotations

from typing import Any

from raggen.models.specs import PASSAGE_FORMATS, PassageFormat


def passage_text(title: str, text: str, sep: str = " . ") -> str:
    """How a passage is shown to encoders and readers: DPR joins title and text."""
    return f"{title}{sep}{text}" if title else text


def _with_prefix(prefix: str, titles: list[str], texts: list[str]) -> tuple[list[str], list[str]]:
    """``prefix`` before what the encoder reads first: a titled row's title (joined and pair alike),
    else its text."""
    titled = [bool(t) for t in titles]
    return (
        [prefix + t if has else t for t, has in zip(titles, titled)],
        [x if has else prefix + x for x, has in zip(texts, titled)],
    )


def tokenize_passages(
    tokenizer,
    titles: list[str],
    texts: list[str],
    *,
    passage_format: PassageFormat,
    max_length: int,
    return_tensors: str = "pt",
    prefix: str = "",
) -> dict[str, Any]:
    """Padded CPU tensors of passages (``return_tensors``: "pt" for torch, "np" for numpy):
    ``pair`` rows are the tokenizer's (title, text) sentence pair, as DPR encoded them; a passage
    without a title is its text alone (DPR did the same); ``joined`` rows are ``title . text``. A
    pure function of the tokenizer, so a CPU stage can tokenise for a GPU stage that only runs the
    model. ``prefix`` (a model's passage prompt, E5's ``passage: ``) starts every row's first
    segment: the joined string, the title of a pair, or the text of an untitled passage."""
    if len(titles) != len(texts):
        raise ValueError(f"{len(titles)} titles but {len(texts)} texts")
    if prefix:
        titles, texts = _with_prefix(prefix, titles, texts)
    limit = dict(truncation=True, max_length=max_length)
    if passage_format == "joined":
        joined = [passage_text(t, x) for t, x in zip(titles, texts)]
        return dict(tokenizer(joined, padding=True, return_tensors=return_tensors, **limit))
    if passage_format != "pair":
        raise ValueError(f"passage_format must be one of {PASSAGE_FORMATS}, got {passage_format!r}")
    rows: list = [None] * len(texts)
    titled = [i for i, t in enumerate(titles) if t]
    untitled = [i for i, t in enumerate(titles) if not t]
    if titled:
        pairs = tokenizer([titles[i] for i in titled], [texts[i] for i in titled], **limit)
        for j, i in enumerate(titled):
            rows[i] = {k: v[j] for k, v in pairs.items()}
    if untitled:
        singles = tokenizer([texts[i] for i in untitled], **limit)
        for j, i in enumerate(untitled):
            rows[i] = {k: v[j] for k, v in singles.items()}
    if not rows:
        return dict(tokenizer([], padding=True, return_tensors=return_tensors, **limit))
    return dict(tokenizer.pad(rows, padding=True, return_tensors=return_tensors))
