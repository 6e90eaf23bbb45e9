"""Split documents into disjoint fixed-length word passages, as DPR built ``psgs_w100.tsv``.

DPR cut each Wikipedia article into consecutive, non-overlapping blocks of 100 words (the last
block of an article may be shorter) and kept the article title with every block.
"""

from __future__ import annotations

import pandas as pd


def chunk_words(text: str, words: int = 100) -> list[str]:
    """Consecutive blocks of ``words`` whitespace-separated words; the last may be shorter.

    Whitespace inside a block is normalised to single spaces; empty text gives no blocks.
    """
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    tokens = text.split()
    return [" ".join(tokens[i:i + words]) for i in range(0, len(tokens), words)]


def chunk_documents(docs: pd.DataFrame, words: int = 100) -> pd.DataFrame:
    """Passages (id, text, title) from documents (id, text[, title]); ids are ``"{doc_id}-{i}"``.

    ``i`` counts a document's blocks from 0. A document with empty text yields no passage.
    """
    missing = [c for c in ("id", "text") if c not in docs.columns]
    if missing:
        raise ValueError(f"documents lack column(s) {missing}; expected id, text, title")
    titles = docs["title"].fillna("").astype(str) if "title" in docs.columns else [""] * len(docs)
    ids: list[str] = []
    texts: list[str] = []
    out_titles: list[str] = []
    seen_docs: set[str] = set()
    for doc_id, text, title in zip(docs["id"].astype(str), docs["text"].fillna("").astype(str), titles):
        if doc_id in seen_docs:
            raise ValueError(f"duplicate document id {doc_id!r}: passage ids would collide")
        seen_docs.add(doc_id)
        for i, block in enumerate(chunk_words(text, words)):
            ids.append(f"{doc_id}-{i}")
            texts.append(block)
            out_titles.append(title)
    return pd.DataFrame({"id": ids, "text": texts, "title": out_titles}, columns=["id", "text", "title"])
