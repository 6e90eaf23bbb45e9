"""Documents in: folders of .md/.txt files and JSONL/parquet document tables become DPR-style
passages (exact word windows, doc ids and offsets), written once per corpus content + settings."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from raggen.corpus.chunking import parse_passage_id
from raggen.corpus.documents import (
    DocumentSettings,
    is_document_corpus,
    iter_documents,
    markdown_parts,
    markdown_title,
    prepare_documents,
    write_markdown_documents,
)
from raggen.corpus.readers import read_passages
from raggen.errors import ConfigError, DataError
from tests.helpers import REPO


def words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def passages_of(path: str) -> pd.DataFrame:
    return pd.read_parquet(path)


def check_windows(passages: pd.DataFrame, doc_words: dict[str, list[str]], size: int, overlap: int) -> None:
    """Every document's passages are exactly its windows: the words at each offset, in order."""
    stride = size - overlap
    for doc_id, ws in doc_words.items():
        rows = passages[passages.doc_id == doc_id]
        expected = []
        for start in range(0, len(ws), stride):
            expected.append(start)
            if start + size >= len(ws):
                break
        assert rows.offset.tolist() == expected, doc_id
        for pid, off, text in zip(rows.id, rows.offset, rows.text):
            assert parse_passage_id(pid) == (doc_id, off)
            assert text.split() == ws[off : off + size]


def _body_words(rel: str, text: str) -> list[str]:
    """The words a document's passages hold: a .md file's without its markup (tested on its own below)."""
    return (markdown_parts(text)[1] if rel.endswith(".md") else text).split()


@pytest.fixture()
def doc_folder(tmp_path):
    root = tmp_path / "docs"
    (root / "guides").mkdir(parents=True)
    texts = {
        "guides/setup.md": "# Setting up\n\n" + " ".join(words("s", 230)) + "\n",
        "notes.txt": "\n".join(" ".join(words(f"n{j}-", 10)) for j in range(12)),  # 120 words over lines
        "plain.md": "no heading here " + " ".join(words("p", 40)),
    }
    for rel, text in texts.items():
        (root / rel).write_text(text, encoding="utf-8")
    (root / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: skipped
    return root, texts


def test_folder_of_text_and_markdown_becomes_100_word_passages(doc_folder, tmp_path):
    root, texts = doc_folder
    out = prepare_documents(str(root), DocumentSettings(chunk_dir=str(tmp_path / "chunks")), None)
    psg = passages_of(out)
    assert set(psg.doc_id) == set(texts)
    body = {rel: text.split() for rel, text in texts.items()}
    body["guides/setup.md"] = words("s", 230)  # its heading is the title, not passage words
    check_windows(psg, body, 100, 0)
    titles = dict(zip(psg.doc_id, psg.title))
    assert titles == {"guides/setup.md": "Setting up", "notes.txt": "notes", "plain.md": "plain"}
    assert psg[psg.doc_id == "guides/setup.md"].id.tolist() == [
        "guides/setup.md#0",
        "guides/setup.md#100",
        "guides/setup.md#200",
    ]
    # the file build_index encodes: read by the ordinary passage reader, ids unique, text never empty
    read = read_passages(out, format="parquet")
    assert read.id.tolist() == psg.id.tolist() and (read.text.str.len() > 0).all()
    info = json.loads((Path(out).parent / "chunking.json").read_text())
    assert info["documents"] == 3 and info["passages"] == len(psg) and info["chunk_words"] == 100


def test_jsonl_of_long_documents_with_overlap(tmp_path):
    docs = {"wiki-1": words("a", 350), "wiki-2": words("b", 99), "wiki-3": words("c", 101)}
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"id": k, "title": k.upper(), "text": " ".join(v)}) + "\n" for k, v in docs.items()),
        encoding="utf-8",
    )
    for size, overlap in ((100, 0), (100, 25), (64, 16)):
        out = prepare_documents(
            str(path), DocumentSettings(chunk_words=size, chunk_overlap=overlap, chunk_dir=str(tmp_path / "chunks"))
        )
        psg = passages_of(out)
        check_windows(psg, docs, size, overlap)
        assert (psg.title == psg.doc_id.str.upper()).all()
    assert passages_of(
        prepare_documents(str(path), DocumentSettings(chunk_dir=str(tmp_path / "chunks")))
    ).id.tolist() == ["wiki-1#0", "wiki-1#100", "wiki-1#200", "wiki-1#300", "wiki-2#0", "wiki-3#0", "wiki-3#100"]


def test_parquet_documents_with_integer_ids(tmp_path):
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"id": [7, 8], "title": ["Seven", None], "text": [" ".join(words("q", 150)), "tiny"]}).to_parquet(path)
    psg = passages_of(prepare_documents(str(path), DocumentSettings(chunk_dir=str(tmp_path / "c"))))
    assert psg.id.tolist() == ["7#0", "7#100", "8#0"] and psg.title.tolist() == ["Seven", "Seven", ""]


def test_prepared_passages_are_reused_until_the_corpus_or_settings_change(doc_folder, tmp_path):
    root, _ = doc_folder
    settings = DocumentSettings(chunk_dir=str(tmp_path / "chunks"))
    first = prepare_documents(str(root), settings)
    mtime = Path(first).stat().st_mtime_ns
    assert prepare_documents(str(root), settings) == first and Path(first).stat().st_mtime_ns == mtime
    other = prepare_documents(str(root), DocumentSettings(chunk_words=50, chunk_dir=str(tmp_path / "chunks")))
    assert other != first
    (root / "new.md").write_text("# New\n\nfresh words", encoding="utf-8")
    changed = prepare_documents(str(root), settings)
    assert changed != first and "new.md#0" in set(passages_of(changed).id)


@pytest.mark.parametrize(
    "text,title",
    [
        ("# Title\n\nbody", "Title"),
        ("intro line\n\n## Second level ##\nbody", "Second level"),
        ("Setext Title\n============\n\nbody", "Setext Title"),
        ("Sub\n---\n", "Sub"),
        ("```\n# not a heading\n```\n# Real\n", "Real"),
        ("---\ntitle: front matter\n---\n# After\n", "After"),
        ("#hashtag is not a heading\n", None),
        ("just text\n", None),
    ],
)
def test_markdown_title(text, title):
    assert markdown_title(text) == title


def test_markdown_passages_hold_words_not_markup():
    """Front matter is metadata and the title heading is the title field: neither is passage text;
    other headings keep their words without their marks; fenced code is kept verbatim."""
    doc = (
        "---\ntitle: Tea notes\ndraft: true\n---\n# Brewing tea\n\nGreen tea wants 80 degrees.\n\n"
        "## Black tea ##\nBoiling water.\n\nOolong\n------\nIn between.\n\n---\n\n```\n# a shell comment\n```\n"
    )
    title, body = markdown_parts(doc)
    assert title == "Brewing tea"
    assert body.split() == ("Green tea wants 80 degrees. Black tea Boiling water. Oolong In between. "
                            "``` # a shell comment ```").split()  # fmt: skip
    linked = (
        '# About [Ray](https://ray.io)\n\nSee [the docs](https://docs.ray.io/en/latest "Docs") and ![a logo](l.png).\n'
    )
    assert markdown_parts(linked) == ("About Ray", "\nSee the docs and a logo.")  # links and images: their text
    assert markdown_parts("x\n\n[not a link] (at all)\n")[1] == "x\n\n[not a link] (at all)"
    setext_title, setext_body = markdown_parts("Tea\n===\n\nbody words\n")
    assert (setext_title, setext_body.split()) == ("Tea", ["body", "words"])
    assert markdown_parts("no heading, # not one\n") == (None, "no heading, # not one")


def test_inline_markdown_marks_bullets_quotes_tables_and_html_leave_only_their_words():
    doc = (
        "# The `raggen` *guide*\n\nUse **bold**, *em*, _em2_, `ray start` and ~~old~~ words.\n"
        "- first item\n* second item\n+ third\n1. numbered stays\n> quoted line\n>> nested quote\n\n"
        "| col a | col b |\n|---|:---:|\n| x | y |\n\n***\n\n"
        'A <br> break <span class="k">kept</span> text <!-- hidden --> and <https://ray.io>.\n'
        "snake_case_name, 2*3*4 and -5 degrees stay.\n## A **bold** heading\n"
        "```\n**kept** in code\n- and this\n```\n"
    )
    title, body = markdown_parts(doc)
    assert title == "The raggen guide"
    assert (
        body.split()
        == (
            "Use bold, em, em2, ray start and old words. first item second item third 1. numbered stays "
            "quoted line nested quote col a col b x y A break kept text and https://ray.io. "
            "snake_case_name, 2*3*4 and -5 degrees stay. A bold heading ``` **kept** in code - and this ```"
        ).split()
    )
    assert markdown_parts("Setext *title*\n===\nbody\n") == ("Setext title", "body")
    # a code span or emphasis that wraps onto the next line of its paragraph (not across paragraphs)
    wrapped = markdown_parts("x\n\nRun `ray\nstart` and **keep\ngoing**.\n\nA lone ` stays.\n\nNext ` too.\n")[1]
    assert wrapped.split() == "x Run ray start and keep going. A lone ` stays. Next ` too.".split()


def test_a_markdown_documents_passages_and_their_offsets_skip_its_markup(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "tea.md").write_text("---\nauthor: x\n---\n# Tea\n\n" + " ".join(words("t", 120)), encoding="utf-8")
    psg = passages_of(prepare_documents(str(root), DocumentSettings(chunk_dir=str(tmp_path / "chunks"))))
    assert psg.id.tolist() == ["tea.md#0", "tea.md#100"] and set(psg.title) == {"Tea"}
    assert psg.text.iloc[0].split() == words("t", 120)[:100]  # offsets count the body's words


def test_bad_inputs_are_named(tmp_path):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(DataError, match="duplicate document id 'a'"):
        prepare_documents(str(dup), DocumentSettings(chunk_dir=str(tmp_path / "c")))
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"id": "a", "body": "x"}\n')
    with pytest.raises(DataError, match=r"notext.jsonl: line 1: missing column 'text'"):
        list(iter_documents(str(notext)))
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.md").write_text("hello")
    (folder / "b.pdf").write_bytes(b"%PDF")
    with pytest.raises(DataError, match="b.pdf: not a document file"):
        list(iter_documents(str(folder)))
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "x.txt").write_bytes("line one\ncaf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"x.txt: line 2: not valid UTF-8"):
        list(iter_documents(str(latin)))
    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_documents(str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="chunk_overlap"):
        DocumentSettings(chunk_words=10, chunk_overlap=10)


def test_document_corpus_detection(doc_folder, tmp_path):
    root, _ = doc_folder
    assert is_document_corpus(str(root)) and is_document_corpus(str(root / "notes.txt"))
    tsv = tmp_path / "psgs_w100.tsv"
    tsv.write_text("id\ttext\ttitle\n1\thello\tT\n")
    assert not is_document_corpus(str(tsv)) and not is_document_corpus(str(tmp_path / "nothing"))
    (root / "passages.jsonl").write_text('{"id": "1", "text": "x"}\n')
    assert not is_document_corpus(str(root))  # a table beside the files: not auto-detected


def test_config_routes_documents_through_chunking_and_leaves_passages_alone(doc_folder, tmp_path):
    from raggen.app.indexing import corpus_passages
    from raggen.config import load_config

    root, texts = doc_folder
    base = [f"index.chunk_dir={tmp_path / 'chunks'}"]
    explicit_uri, explicit_format = corpus_passages(
        load_config(
            None,
            [
                *base,
                f"index.passages={root}",
                "index.input=documents",
                "index.chunk_words=50",
                "index.chunk_overlap=10",
            ],
        ).index
    )
    assert explicit_format == "parquet" and explicit_uri.startswith(str(tmp_path / "chunks"))
    check_windows(passages_of(explicit_uri), {r: _body_words(r, t) for r, t in texts.items()}, 50, 10)
    auto_uri, auto_format = corpus_passages(load_config(None, [*base, f"index.passages={root}"]).index)  # .md/.txt
    assert auto_format == "parquet" and len(passages_of(auto_uri)) > len(texts)
    tsv = tmp_path / "psgs_w100.tsv"
    tsv.write_text("id\ttext\ttitle\n1\thello\tT\n")
    plain = corpus_passages(load_config(None, [*base, f"index.passages={tsv}"]).index)
    assert plain == (str(tsv), "auto")  # DPR's TSV: untouched
    with pytest.raises(ConfigError, match="chunk_overlap"):
        load_config(None, ["index.chunk_words=10", "index.chunk_overlap=10"])
    with pytest.raises(ConfigError, match="dpr-tsv"):
        load_config(None, ["index.input=documents", "index.format=dpr-tsv"])


def test_shipped_example_documents_chunk_as_the_config_says(tmp_path):
    from raggen.app.indexing import corpus_passages
    from raggen.config import load_config, with_absolute_paths

    cfg = load_config(REPO / "configs" / "documents.yaml", [f"index.chunk_dir={tmp_path}"])
    cfg.index.passages = str(REPO / cfg.index.passages)
    cfg = with_absolute_paths(cfg)
    psg = passages_of(corpus_passages(cfg.index)[0])
    files = sorted(p for p in (REPO / "examples" / "docs").iterdir() if p.suffix in (".md", ".txt"))
    assert 5 <= len(files) <= 10 and set(psg.doc_id) == {p.name for p in files}
    check_windows(
        psg,
        {p.name: _body_words(p.name, p.read_text(encoding="utf-8")) for p in files},
        cfg.index.chunk_words,
        cfg.index.chunk_overlap,
    )
    assert dict(zip(psg.doc_id, psg.title))["tea.md"] == "Green and black tea"


def test_write_markdown_documents_round_trips_titles(tmp_path):
    table = pd.DataFrame({"id": ["a/1", "b"], "title": ["Alpha", "Beta"], "text": ["one two", "three"]})
    folder = write_markdown_documents(table, tmp_path / "md")
    docs = {d.id: d for d in iter_documents(str(folder))}
    assert {d.title for d in docs.values()} == {"Alpha", "Beta"} and docs["b.md"].text.split() == ["three"]
