"""Documents in, passages out: read a document corpus and cut it into DPR-style word passages.

A document corpus is a file or a folder (local or ``s3://``) of:

* ``.jsonl`` / ``.jsonl.gz`` / ``.json`` (one JSON object a line) or ``.parquet`` tables of
  documents with ``id`` and ``text`` (and optionally ``title``);
* ``.md`` / ``.markdown`` / ``.txt`` files, one document each: the id is the file's path relative
  to the folder (``guides/setup.md``), the text is the whole file, the title is the first Markdown
  heading of a ``.md`` file (ATX ``# Title`` or setext, outside code fences and front matter), else
  the file name without its suffix. A ``.md`` file's text loses its front matter, that heading and
  the other headings' ``#`` marks (:func:`markdown_parts`): word offsets count the words that remain.

Names starting with ``.`` or ``_`` are skipped (``.DS_Store``, ``_SUCCESS``). Any other file is a
DataError naming it. :func:`prepare_documents` chunks the corpus (``raggen.corpus.chunking``:
100-word windows by default, the passage id ``"{doc_id}#{word offset}"``) into one parquet file of
passages (``id``, ``title``, ``text`` and the extra columns ``doc_id``, ``offset``), written
atomically under a folder keyed by the corpus content and the chunk settings, so that a rerun (and
the index build's resumable work dir, which keys on that file) reuses it.

Library code: no config, no Ray. ``raggen.app.indexing`` hands it the config's settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from raggen.corpus.chunking import iter_chunked
from raggen.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".md", ".markdown", ".txt")
MARKDOWN_SUFFIXES = (".md", ".markdown")
TABLE_SUFFIXES = ((".jsonl.gz", "jsonl"), (".jsonl", "jsonl"), (".json.gz", "jsonl"), (".json", "jsonl"),
                  (".parquet", "parquet"))  # fmt: skip
PASSAGE_SUFFIXES = (".tsv", ".tsv.gz")  # passage-only formats: never documents
DOCUMENT_FORMATS = ("auto", "jsonl", "parquet")
PREPARED_NAME = "passages.parquet"
_PREPARE_VERSION = 4  # bump when the chunked output of the same input and settings changes


@dataclass(frozen=True)
class DocumentSettings:
    """How a document corpus becomes passages."""

    chunk_words: int = 100  # words per passage (DPR: 100)
    chunk_overlap: int = 0  # words shared by consecutive passages of a document (DPR: 0)
    format: str = "auto"  # document tables: auto (by suffix), jsonl or parquet
    chunk_dir: str | None = None  # where the chunked passages go (folder or s3://); None: a local temp folder

    def __post_init__(self) -> None:
        if self.chunk_words < 1:
            raise ConfigError(f"chunk_words: must be >= 1, got {self.chunk_words}")
        if not 0 <= self.chunk_overlap < self.chunk_words:
            raise ConfigError(
                f"chunk_overlap: must be in [0, chunk_words={self.chunk_words}), got {self.chunk_overlap}"
            )
        if self.format not in DOCUMENT_FORMATS:
            raise ConfigError(f"format: documents are read as {', '.join(DOCUMENT_FORMATS)}; got {self.format!r}")


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


# --------------------------------------------------------------------------- titles


_ATX = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
#: ``[text](target)`` links and ``![alt](src)`` images, inline (no nested brackets): their text is the content
_LINK = re.compile(r"!?\[([^\[\]]*)\]\([^()\s]*(?:\s+\"[^\"]*\")?\)")
#: inline marks whose words are the content (CommonMark's common cases, not its every corner);
#: matched over a whole paragraph, since a code span or emphasis may wrap onto the next line
_INLINE_MARKS = tuple(
    (re.compile(pattern, re.DOTALL), repl)
    for pattern, repl in (
        (r"<(https?://[^>\s]+)>", r"\1"),  # an autolink: its address
        (r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>", ""),  # HTML comments and tags
        (r"(`+)(.+?)\1", r"\2"),  # inline code: its text
        (r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1", r"\2"),  # strong
        (r"(?<![\w*])\*(?=[^\s*])([^*]+?)(?<=\S)\*(?![\w*])", r"\1"),  # *emphasis*
        (r"(?<!\w)_(?=[^\s_])([^_]+?)(?<=\S)_(?!\w)", r"\1"),  # _emphasis_ (not snake_case)
        (r"~~(?=\S)(.+?)(?<=\S)~~", r"\1"),  # strikethrough
    )
)
#: at a line's start: a bullet (``-``, ``*``, ``+``) or block quote marks; numbered items keep their number
_LINE_MARKS = re.compile(r"^(\s*)(?:>\s?)*(?:[-*+][ \t]+)?")
#: lines that are markup only: a table's header rule (``|---|:---:|``) or a ``***`` / ``___`` rule
_RULE_LINE = re.compile(r"^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)+\|?\s*$|^ {0,3}([*_])(?:[ \t]*\1){2,}[ \t]*$")


def _inline_text(text: str) -> str:
    """Links and images as their text; emphasis, inline code and HTML tags without their marks."""
    text = _LINK.sub(r"\1", text)
    for pattern, repl in _INLINE_MARKS:
        text = pattern.sub(repl, text)
    return text


def _without_line_marks(line: str) -> str:
    """A body line without its bullet and quote marks; a table row's cells without their pipes."""
    line = _LINE_MARKS.sub(r"\1", line, count=1)
    if line.lstrip().startswith("|"):
        line = " ".join(cell.strip() for cell in line.strip().strip("|").split("|"))
    return line


def markdown_title(text: str) -> str | None:
    """The text of the first Markdown heading (``# Title`` or a setext ``Title`` over ``===``/``---``),
    skipping YAML front matter and fenced code; None when there is none."""
    return markdown_parts(text)[0]


def markdown_parts(text: str) -> tuple[str | None, str]:
    """(title, body) of a Markdown document: the title as :func:`markdown_title` finds it, and the
    text passages should hold: without the YAML front matter (metadata, not content), without the
    title's heading (the passage's title field carries it), other headings with their words but not
    their ``#`` marks, setext underlines and ``---`` rules dropped, links and images as their text
    (``[Ray](https://ray.io)`` -> ``Ray``), and emphasis, inline code, HTML tags, bullets, quote
    marks and table pipes without their marks (inline marks per paragraph). Fenced code stays as it is."""
    lines = text.splitlines()
    start = 0
    if lines and lines[0].strip() == "---":  # front matter: up to the next --- line
        end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
        start = end + 1 if end is not None else 0
    title: str | None = None
    body: list[str] = []
    paragraph: list[str] = []  # prose lines, their inline marks removed together (they may wrap)
    fence = None
    previous = ""

    def end_paragraph() -> None:
        if paragraph:
            body.append(_inline_text("\n".join(paragraph)))
            paragraph.clear()

    for line in lines[start:]:
        marker = _FENCE.match(line)
        if marker or fence:
            end_paragraph()
            if marker:
                fence = None if fence == marker.group(1) else (fence or marker.group(1))
            previous = ""
            body.append(line)
            continue
        atx = _ATX.match(line)
        if atx and atx.group(1).strip():
            end_paragraph()
            heading = _inline_text(atx.group(1)).strip()
            if title is None:
                title = heading
            else:
                body.append(heading)
            previous = ""
            continue
        setext = _SETEXT.match(line)
        if setext or _RULE_LINE.match(line):
            if setext and previous.strip() and not previous.startswith((" " * 4, "\t")) and title is None:
                title = _inline_text(previous).strip()
                paragraph.pop()  # the title's own line
            end_paragraph()
            previous = ""
            continue  # an underline or a rule: markup, no words
        if not line.strip():
            end_paragraph()
            body.append(line)
        else:
            paragraph.append(_without_line_marks(line))
        previous = line
    end_paragraph()
    return title, "\n".join(body)


# --------------------------------------------------------------------------- reading


def _suffix_kind(name: str, format: str) -> str | None:
    """``text``, ``jsonl`` or ``parquet`` for a file name, or None when it is none of them."""
    lower = name.lower()
    if lower.endswith(TEXT_SUFFIXES):
        return "text"
    kind = next((fmt for suffix, fmt in TABLE_SUFFIXES if lower.endswith(suffix)), None)
    return format if format != "auto" and kind is None else kind


def _skipped(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in PurePosixPath(rel).parts)


def _read_text_file(path: Path, source: str) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{source}: line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    return text.removeprefix("\ufeff")


def _text_document(path: Path, rel: str, source: str) -> Document:
    text = _read_text_file(path, source)
    name = PurePosixPath(rel).name
    title = None
    if name.lower().endswith(MARKDOWN_SUFFIXES):
        title, text = markdown_parts(text)
    stem = name[: -len(PurePosixPath(name).suffix)] if PurePosixPath(name).suffix else name
    return Document(id=rel, title=title or stem, text=text)


def _field(
    source: str, where: str, obj: Mapping[str, Any], key: str, *, required: bool, allow_int: bool = False
) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{source}: {where}: missing column {key!r} (columns: {list(obj)})")
        return ""
    if isinstance(value, str) or (allow_int and isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise DataError(f"{source}: {where}: column {key!r} must be a string, got {type(value).__name__}")


def _table_document(source: str, where: str, obj: Mapping[str, Any]) -> Document:
    doc_id = _field(source, where, obj, "id", required=True, allow_int=True).strip()
    if not doc_id:
        raise DataError(f"{source}: {where}: empty document id")
    return Document(
        doc_id, _field(source, where, obj, "title", required=False), _field(source, where, obj, "text", required=True)
    )


def _jsonl_documents(path: Path, source: str) -> Iterator[Document]:
    from raggen.corpus.text_files import iter_jsonl_objects

    for lineno, obj in iter_jsonl_objects(path):
        yield _table_document(source, f"line {lineno}", obj)


def _parquet_documents(path: Path, source: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{source}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    for col in ("id", "text"):
        if col not in names:
            raise DataError(f"{source}: missing column {col!r} (columns: {names})")
    columns = [c for c in ("id", "title", "text") if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        for obj in batch.to_pylist():
            row += 1
            yield _table_document(source, f"row {row}", obj)


def _file_documents(path: Path, rel: str, source: str, format: str) -> Iterator[Document]:
    kind = _suffix_kind(rel, format)
    if kind == "text":
        yield _text_document(path, rel, source)
    elif kind == "jsonl":
        yield from _jsonl_documents(path, source)
    elif kind == "parquet":
        yield from _parquet_documents(path, source)
    else:
        raise DataError(
            f"{source}: not a document file (expected .md, .markdown, .txt, .jsonl[.gz], .json[.gz] or .parquet)"
        )


def document_files(uri: str, s3_options: Mapping[str, Any] | None = None) -> tuple[bool, list[str]]:
    """(is a folder, the file names in it relative to ``uri``, sorted, hidden ones skipped); a single
    file gives (False, [its name])."""
    from raggen.storage import exists, is_s3_uri, list_uri

    if is_s3_uri(uri):
        if not uri.endswith("/") and exists(uri, s3_options):
            return False, [uri.rstrip("/").rsplit("/", 1)[-1]]
        names = [n for n in list_uri(uri, s3_options) if not _skipped(n)]
        if not names:
            raise DataError(f"{uri}: no such object, or an empty prefix")
        return True, names
    path = Path(os.path.expanduser(uri))
    if path.is_file():
        return False, [path.name]
    if not path.is_dir():
        raise DataError(f"{uri}: no such file or folder")
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    names = [n for n in names if not _skipped(n)]
    if not names:
        raise DataError(f"{uri}: an empty folder (no document files)")
    return True, names


def iter_documents(
    uri: str, *, format: str = "auto", s3_options: Mapping[str, Any] | None = None
) -> Iterator[Document]:
    """Every document of a file or folder (local or s3://), in file-name order (one object at a time
    is downloaded from S3)."""
    from raggen.storage import is_s3_uri, join_uri, open_store

    folder, names = document_files(uri, s3_options)
    if not is_s3_uri(uri):
        root = Path(os.path.expanduser(uri))
        for name in names:
            path = root / name if folder else root
            yield from _file_documents(path, name if folder else path.name, str(path), format)
        return
    parent = uri.rstrip("/") if folder else uri.rsplit("/", 1)[0]
    store = open_store(parent, s3_options)
    with tempfile.TemporaryDirectory(prefix="raggen-documents-") as tmp:
        for name in names:
            local = Path(tmp) / PurePosixPath(name).name
            store.download_file(name, local)
            try:
                yield from _file_documents(local, name, join_uri(parent, name), format)
            finally:
                local.unlink(missing_ok=True)


def is_document_corpus(uri: str, s3_options: Mapping[str, Any] | None = None) -> bool:
    """True for a ``.md``/``.markdown``/``.txt`` file, or a folder holding such files and no passage
    or table files (``.tsv``, ``.jsonl``, ``.parquet`` ...): what ``index.input: passages`` takes
    for documents anyway. Missing paths are False (the reader reports them)."""
    try:
        _, names = document_files(uri, s3_options)
    except DataError:
        return False
    kinds = {_suffix_kind(n, "auto") for n in names}
    passage_files = any(n.lower().endswith(PASSAGE_SUFFIXES) for n in names)
    return kinds == {"text"} and not passage_files


def write_markdown_documents(docs, folder: str | os.PathLike) -> Path:
    """One ``<id>.md`` per row of ``docs`` (id, title, text), ``# title`` then the text: a document
    folder made from any passage table (the dry run's generated world, tests)."""
    from raggen.storage import atomic_write_bytes

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for doc_id, title, text in zip(docs["id"], docs["title"], docs["text"]):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(doc_id)).strip("-.") or "doc"
        atomic_write_bytes(out / f"{name}.md", f"# {title}\n\n{text}\n".encode())
    return out


# --------------------------------------------------------------------------- chunk + write


def _prepared_key(uri: str, settings: DocumentSettings, s3_options) -> str:
    from raggen.storage import content_fingerprint

    signature = {
        "uri": str(uri),
        "content": content_fingerprint(str(uri), s3_options),
        "words": settings.chunk_words,
        "overlap": settings.chunk_overlap,
        "format": settings.format,
        "version": _PREPARE_VERSION,
    }
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_chunk_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "raggen-documents")


def write_passages_parquet(
    docs: Iterator[Document], path: str | os.PathLike, settings: DocumentSettings, *, batch_rows: int = 8192
) -> tuple[int, int]:
    """Chunk ``docs`` into ``path`` (parquet: id, title, text, doc_id, offset), streamed in batches and
    published atomically; returns (documents, passages)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raggen.storage import AtomicFile

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string()),
                        ("doc_id", pa.string()), ("offset", pa.int64())])  # fmt: skip
    counts = {"docs": 0}

    def triples():
        for doc in docs:
            counts["docs"] += 1
            yield doc.id, doc.title, doc.text

    passages = 0
    with AtomicFile(path, "wb", compress=False) as f, pq.ParquetWriter(f, schema) as writer:
        rows: list[tuple] = []

        def flush() -> None:
            ids, texts, titles, doc_ids, offsets = zip(*rows)
            writer.write_table(pa.table({"id": ids, "title": titles, "text": texts, "doc_id": doc_ids,
                                         "offset": offsets}, schema=schema))  # fmt: skip
            rows.clear()

        try:
            for row in iter_chunked(triples(), settings.chunk_words, settings.chunk_overlap):
                rows.append(row)
                passages += 1
                if len(rows) >= batch_rows:
                    flush()
        except ValueError as e:  # a duplicate document id
            raise DataError(f"documents: {e}") from None
        if rows:
            flush()
    if passages == 0:
        Path(path).unlink(missing_ok=True)
        raise DataError(f"documents: {counts['docs']} document(s) and not one word of text")
    return counts["docs"], passages


def prepare_documents(
    uri: str, settings: DocumentSettings = DocumentSettings(), s3_options: Mapping[str, Any] | None = None
) -> str:
    """The passage file (parquet) of the document corpus ``uri``: chunked now, or reused when an
    earlier call with the same corpus content and settings made it. It lies at
    ``<chunk_dir>/<key>/passages.parquet`` (``key``: corpus content + settings) beside a
    ``chunking.json`` that records how it was made."""
    from raggen.storage import exists, is_s3_uri, join_uri, open_store

    root = settings.chunk_dir or default_chunk_dir()
    key = _prepared_key(uri, settings, s3_options)
    folder = join_uri(root, key) if is_s3_uri(root) else str(Path(os.path.expanduser(root)) / key)
    target = join_uri(folder, PREPARED_NAME) if is_s3_uri(folder) else str(Path(folder) / PREPARED_NAME)
    if exists(target, s3_options):
        log.info("documents %s: reusing the passages chunked earlier in %s", uri, target)
        return target
    docs = iter_documents(uri, format=settings.format, s3_options=s3_options)
    info = {"documents_uri": str(uri), **asdict(settings)}
    if is_s3_uri(folder):
        with tempfile.TemporaryDirectory(prefix="raggen-chunk-") as tmp:
            n_docs, n_passages = write_passages_parquet(docs, Path(tmp) / PREPARED_NAME, settings)
            store = open_store(folder, s3_options)
            store.write_bytes(
                "chunking.json", json.dumps({**info, "documents": n_docs, "passages": n_passages}).encode()
            )
            store.upload_file(Path(tmp) / PREPARED_NAME, PREPARED_NAME)  # one PUT: the object appears whole
    else:
        from raggen.storage import atomic_write_bytes

        n_docs, n_passages = write_passages_parquet(docs, target, settings)
        atomic_write_bytes(
            Path(folder) / "chunking.json", json.dumps({**info, "documents": n_docs, "passages": n_passages}).encode()
        )
    log.info(
        "documents %s: %d documents -> %d passages of %d words (overlap %d) in %s",
        uri,
        n_docs,
        n_passages,
        settings.chunk_words,
        settings.chunk_overlap,
        target,
    )
    return target
