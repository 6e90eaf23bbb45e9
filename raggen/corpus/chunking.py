"""Cut documents into fixed-length word passages, as DPR built ``psgs_w100.tsv``.

DPR cut each Wikipedia article into consecutive, non-overlapping blocks of 100 words (the last
block of an article may be shorter) and kept the article title with every block. ``overlap`` (not
DPR's) lets consecutive windows share words: window ``n`` starts at word ``n * (words - overlap)``,
and no window is emitted that the previous one already covers to the end of the document.

Words are whitespace-separated tokens of the document text; a passage's text is its words joined by
single spaces. Each passage keeps its document id and the 0-based word offset where it starts; the
passage id carries both, ``"{doc_id}#{offset}"`` (:func:`passage_id`, :func:`parse_passage_id`),
because the published shard tables hold only ``id``, ``title`` and ``text``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pandas as pd

ID_SEPARATOR = "#"
PASSAGE_COLUMNS = ("id", "text", "title", "doc_id", "offset")


def _check(words: int, overlap: int) -> None:
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    if not 0 <= overlap < words:
        raise ValueError(f"overlap must be in [0, words) = [0, {words}), got {overlap}")


def word_windows(num_words: int, words: int = 100, overlap: int = 0) -> list[tuple[int, int]]:
    """(start, end) word ranges of the windows over a text of ``num_words`` words.

    Windows start every ``words - overlap`` words; the last one ends at the text's end (it may be
    shorter); an empty text has no window.
    """
    _check(words, overlap)
    stride = words - overlap
    out = []
    for start in range(0, num_words, stride):
        out.append((start, min(start + words, num_words)))
        if start + words >= num_words:
            break
    return out


def chunk_text(text: str, words: int = 100, overlap: int = 0) -> list[tuple[int, str]]:
    """(word offset, passage text) of each window of ``text`` (see :func:`word_windows`)."""
    tokens = text.split()
    return [(start, " ".join(tokens[start:end])) for start, end in word_windows(len(tokens), words, overlap)]


def chunk_words(text: str, words: int = 100, overlap: int = 0) -> list[str]:
    """The passage texts of :func:`chunk_text`: with ``overlap=0``, consecutive disjoint blocks of
    ``words`` words whose concatenation is the text (whitespace normalised to single spaces)."""
    return [passage for _, passage in chunk_text(text, words, overlap)]


def passage_id(doc_id: str, offset: int) -> str:
    """``"{doc_id}#{offset}"``: the document and the word where the passage starts."""
    return f"{doc_id}{ID_SEPARATOR}{int(offset)}"


def parse_passage_id(pid: str) -> tuple[str, int]:
    """(document id, word offset) of a passage id made by :func:`passage_id` (the document id may
    itself contain ``#``: the offset is what follows the last one)."""
    doc_id, sep, offset = str(pid).rpartition(ID_SEPARATOR)
    if not sep or not doc_id or not offset.isdigit():
        raise ValueError(f"passage id {pid!r} is not of the form '<doc_id>#<word offset>'")
    return doc_id, int(offset)


def iter_chunked(
    docs: Iterable[tuple[str, str, str]], words: int = 100, overlap: int = 0
) -> Iterator[tuple[str, str, str, str, int]]:
    """(passage id, text, title, doc id, offset) for each window of each (doc id, title, text).

    A document id seen twice is a ValueError (its passage ids would collide); a document with no
    words yields no passage.
    """
    _check(words, overlap)
    seen: set[str] = set()
    for doc_id, title, text in docs:
        doc_id = str(doc_id)
        if doc_id in seen:
            raise ValueError(f"duplicate document id {doc_id!r}: passage ids would collide")
        seen.add(doc_id)
        for offset, passage in chunk_text(text or "", words, overlap):
            yield passage_id(doc_id, offset), passage, title or "", doc_id, offset


def chunk_documents(docs: pd.DataFrame, words: int = 100, overlap: int = 0) -> pd.DataFrame:
    """Passages (id, text, title, doc_id, offset) from documents (id, text[, title]).

    Ids are ``"{doc_id}#{offset}"``; a document with empty text yields no passage.
    """
    missing = [c for c in ("id", "text") if c not in docs.columns]
    if missing:
        raise ValueError(f"documents lack column(s) {missing}; expected id, text, title")
    titles = docs["title"].fillna("").astype(str) if "title" in docs.columns else [""] * len(docs)
    rows = list(iter_chunked(zip(docs["id"].astype(str), titles, docs["text"].fillna("").astype(str)), words, overlap))
    frame = pd.DataFrame(rows, columns=list(PASSAGE_COLUMNS))
    return frame.astype({"offset": "int64"})
