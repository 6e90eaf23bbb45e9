"""DPR-style chunking: exact word windows (disjoint by default, overlapping on request), passage ids
that carry the document id and the word offset."""

from __future__ import annotations

import pandas as pd
import pytest

from raggen.corpus.chunking import (
    chunk_documents,
    chunk_text,
    chunk_words,
    iter_chunked,
    parse_passage_id,
    passage_id,
    word_windows,
)


def test_chunk_words_disjoint_blocks_cover_the_text():
    words = [f"w{i}" for i in range(257)]
    blocks = chunk_words("  ".join(words) + "\n", words=100)
    assert [len(b.split()) for b in blocks] == [100, 100, 57]
    assert " ".join(blocks).split() == words  # disjoint and in order: concatenation is the text
    assert chunk_words("   ") == []
    assert chunk_words("a b", words=100) == ["a b"]
    with pytest.raises(ValueError):
        chunk_words("a", words=0)


@pytest.mark.parametrize(
    "n,words,overlap,windows",
    [
        (0, 100, 0, []),
        (100, 100, 0, [(0, 100)]),
        (101, 100, 0, [(0, 100), (100, 101)]),
        (250, 100, 0, [(0, 100), (100, 200), (200, 250)]),
        (250, 100, 20, [(0, 100), (80, 180), (160, 250)]),
        (180, 100, 20, [(0, 100), (80, 180)]),  # ends exactly: no window inside the previous one
        (181, 100, 20, [(0, 100), (80, 180), (160, 181)]),
        (10, 4, 3, [(0, 4), (1, 5), (2, 6), (3, 7), (4, 8), (5, 9), (6, 10)]),
    ],
)
def test_word_windows_exact(n, words, overlap, windows):
    assert word_windows(n, words, overlap) == windows


@pytest.mark.parametrize("words,overlap", [(0, 0), (10, 10), (10, -1), (10, 11)])
def test_word_windows_refuse_bad_settings(words, overlap):
    with pytest.raises(ValueError):
        word_windows(50, words, overlap)


def test_overlapping_windows_share_exactly_overlap_words():
    words = [f"w{i}" for i in range(230)]
    chunks = chunk_text(" ".join(words), words=100, overlap=30)
    assert [off for off, _ in chunks] == [0, 70, 140]
    for off, text in chunks:
        assert text.split() == words[off : off + 100]  # the window at its offset, word for word
    first, second = chunks[0][1].split(), chunks[1][1].split()
    assert first[-30:] == second[:30]


def test_passage_id_round_trip_even_with_hash_in_the_document_id():
    assert passage_id("guide.md", 200) == "guide.md#200"
    assert parse_passage_id("notes#2024.md#300") == ("notes#2024.md", 300)
    for bad in ("no-offset", "#5", "doc#", "doc#x"):
        with pytest.raises(ValueError):
            parse_passage_id(bad)


def test_chunk_documents_ids_titles_offsets():
    docs = pd.DataFrame(
        {
            "id": ["d1", "d2", "d3"],
            "text": [" ".join(f"x{i}" for i in range(230)), "short doc", ""],
            "title": ["One", "Two", "Three"],
        }
    )
    out = chunk_documents(docs, words=100)
    assert out.columns.tolist() == ["id", "text", "title", "doc_id", "offset"]
    assert out.id.tolist() == ["d1#0", "d1#100", "d1#200", "d2#0"]
    assert out.doc_id.tolist() == ["d1", "d1", "d1", "d2"] and out.offset.tolist() == [0, 100, 200, 0]
    assert out.title.tolist() == ["One", "One", "One", "Two"]
    assert [len(t.split()) for t in out.text] == [100, 100, 30, 2]
    assert out.text[2].split()[0] == "x200"
    with pytest.raises(ValueError, match="duplicate document id"):
        chunk_documents(pd.concat([docs, docs]))
    with pytest.raises(ValueError, match="text"):
        chunk_documents(docs.drop(columns="text"))


def test_iter_chunked_with_overlap_keeps_titles_and_offsets():
    rows = list(iter_chunked([("a", "T", " ".join(map(str, range(25))))], words=10, overlap=5))
    assert [(r[0], r[3], r[4]) for r in rows] == [
        ("a#0", "a", 0),
        ("a#5", "a", 5),
        ("a#10", "a", 10),
        ("a#15", "a", 15),
    ]
    assert rows[-1][1] == " ".join(map(str, range(15, 25))) and all(r[2] == "T" for r in rows)
