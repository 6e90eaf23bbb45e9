"""Reading a published version: resolve it (LATEST or a version folder), verify every sha256 and
count, and open its shards memory-mapped; ``verify_version`` does the same on the store's bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raggen.errors import IndexIntegrityError
from raggen.index.latest import _read_latest
from raggen.index.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    _read_manifest_at,
    check_version_name,
)
from raggen.index.passage_blocks import PassageBlocks
from raggen.index.passage_cache import derived_dir, open_blocks, open_vectors
from raggen.index.passage_table import int64_column
from raggen.index.passage_vectors import PassageVectors
from raggen.index.shard import index_ids
from raggen.index.version_cache import cache_mark_used, evict_cached_versions
from raggen.storage import (
    ChecksumMismatch,
    LocalStore,
    S3Options,
    copy_to_local,
    default_cache_dir,
    is_s3_uri,
    iter_file_chunks,
    join_uri,
    open_store,
    sha256_chunks,
    sha256_file,
)

logger = logging.getLogger(__name__)


@dataclass
class LoadedShard:
    """One verified shard: its FAISS index, opened once (memory-mapped from the store's folder or
    the local cache where the type allows, see ``shard.open_index_file``), and its passage table
    (its columns decoded into this process, without the ``embedding`` column unless it was asked
    for; with ``passage_store="mapped"`` only ``row_id``, the rest in ``texts`` / ``vectors``)."""

    entry: ShardEntry
    passages: pa.Table
    index_path: Path
    faiss_index: Any = field(default=None, repr=False)
    texts: PassageBlocks | None = field(default=None, repr=False)  # passage_store="mapped": id/title/text
    vectors: PassageVectors | None = field(default=None, repr=False)  # passage_store="mapped": stored embeddings

    def index(self):
        """The opened FAISS index (the same object every call: never deserialized twice)."""
        return self.faiss_index

    @property
    def index_bytes(self) -> np.ndarray:
        """The serialized index as stored: a read-only memory map of the file."""
        return _mapped(self.index_path)

    @property
    def has_embeddings(self) -> bool:
        return self.vectors is not None or "embedding" in self.passages.column_names


@dataclass
class LoadedVersion:
    uri: str  # the version's folder / prefix
    manifest: Manifest
    shards: list[LoadedShard] = field(default_factory=list)
    shard_numbers: list[int] = field(default_factory=list)  # positions in manifest.shards of ``shards``
    s3_options: Any = field(default=None, repr=False)  # how it was read (shard actors read it the same way)
    cache_dir: str | None = None

    @property
    def version(self) -> str:
        return self.manifest.version


def _version_store(uri: str, version: str | None, s3_options):
    """(store of the version folder, its URI, the version it must hold or None).

    ``uri`` is a root (LATEST is read when ``version`` is None) or a version folder."""
    root = open_store(uri, s3_options)
    if version is None:
        if root.exists(MANIFEST_NAME):
            return root, root.uri, None
        latest = _read_latest(root)
        if latest is None:
            raise IndexIntegrityError(
                f"{join_uri(root.uri, LATEST_NAME)}: missing (nothing published, and no manifest.json)"
            )
        version = latest
    check_version_name(version)
    vuri = join_uri(root.uri, version)
    return open_store(vuri, s3_options), vuri, version


def resolve_version_uri(uri: str, version: str | None = None, *, s3_options=None) -> str:
    """The folder / prefix of ``version`` (LATEST when None; ``uri`` itself if it is a version folder)."""
    return _version_store(uri, version, s3_options)[1]


def read_manifest(uri: str, version: str | None = None, *, s3_options=None) -> Manifest:
    """The manifest of ``version`` (LATEST when None, or ``uri`` itself when it is a version folder)."""
    store, vuri, expected = _version_store(uri, version, s3_options)
    return _read_manifest_at(store, vuri, expected)


def _mapped(path: Path) -> np.ndarray:
    """The file as a read-only uint8 array, memory-mapped (never read whole into memory)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _mismatch(source: str, expected: str, got: str, size: int) -> IndexIntegrityError:
    return IndexIntegrityError(
        f"{source}: sha256 mismatch (expected {expected[:16]}..., got {got[:16]}..., {size} bytes)"
    )


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class _Verified:
    """A file whose bytes matched the manifest: its local path (the store's own file, or the
    cache's copy) and, for a store's own file, its identity when hashed."""

    path: Path
    source: str
    identity: tuple[int, int, int, int] | None = None

    def check_unchanged(self) -> None:
        """The file opened by path is the one hashed (a rename over it in between is refused)."""
        if self.identity is not None and _identity(os.stat(self.path)) != self.identity:
            raise IndexIntegrityError(f"{self.source}: replaced while it was being loaded")


def _fetch_verified(store, vuri: str, name: str, expected: str, cache: Path | None, *, from_store: bool) -> _Verified:
    """The file's local path after checking its sha256 (streamed; nothing is read whole).

    A local store's file is hashed in place. An S3 object is streamed into the cache while it is
    hashed: the hash is the store's bytes. With ``from_store=False`` (loading for serving) a
    cached copy whose sha256 matches is used instead; ``verify`` always reads the store.
    """
    source = join_uri(vuri, name)
    if isinstance(store, LocalStore):
        path = store.local_path(name)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise IndexIntegrityError(f"{source}: missing") from None
        with f:
            st = os.fstat(f.fileno())
            got = sha256_chunks(iter_file_chunks(f))
        if got != expected:
            raise _mismatch(source, expected, got, st.st_size)
        return _Verified(Path(path), source, _identity(st))
    local = cache / name
    if not from_store and local.is_file() and sha256_file(local) == expected:
        return _Verified(local, source)
    try:
        copy_to_local(store, name, local, expected_sha256=expected)
    except FileNotFoundError:
        raise IndexIntegrityError(f"{source}: missing") from None
    except ChecksumMismatch as exc:
        raise _mismatch(source, expected, exc.got, exc.size) from None
    return _Verified(local, source)


def _open_index(vuri: str, entry: ShardEntry, file: _Verified):
    """The shard's FAISS index, opened once from its verified file (memory-mapped)."""
    from raggen.index.shard import open_index_file

    try:
        index = open_index_file(file.path)
    except RuntimeError as exc:
        raise IndexIntegrityError(
            f"{join_uri(vuri, entry.index)}: not a readable FAISS index ({str(exc).strip().splitlines()[-1]})"
        ) from None
    file.check_unchanged()
    return index


def _read_passages(
    vuri: str, entry: ShardEntry, file: _Verified, columns: list[str] | None
) -> tuple[pa.Table, pa.Schema]:
    """The verified parquet file read with a memory map, only ``columns`` (None: all).

    Through ``pq.ParquetFile`` on one thread, not ``pq.read_table``: the latter goes through the
    dataset layer, whose first use in a process costs ~55 MB of RSS (its thread pools and their
    allocator arenas, libarrow_dataset's pages) whatever the file's size, measured in a shard
    actor; a shard is one file, read once, so the dataset layer buys nothing here."""
    try:
        with pq.ParquetFile(file.path, memory_map=True) as pf:
            schema = pf.schema_arrow
            cols = None if columns is None else [c for c in columns if c in schema.names]
            table = pf.read(columns=cols, use_threads=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexIntegrityError(f"{join_uri(vuri, entry.passages)}: not a readable parquet file ({exc})") from None
    file.check_unchanged()
    return table, schema


def _check_shard(vuri: str, manifest: Manifest, entry: ShardEntry, index, table: pa.Table, schema: pa.Schema) -> None:
    """Counts, dimensions and ids agree between manifest, parquet and index."""
    ppath, ipath = join_uri(vuri, entry.passages), join_uri(vuri, entry.index)
    missing = {"row_id", "id", "title", "text"} - set(schema.names)
    if missing:
        raise IndexIntegrityError(f"{ppath}: missing column(s) {sorted(missing)}")
    if table.num_rows != entry.count:
        raise IndexIntegrityError(f"{ppath}: {table.num_rows} rows, manifest count is {entry.count}")
    emb_type = schema.field("embedding").type if "embedding" in schema.names else None
    if emb_type is not None and getattr(emb_type, "list_size", None) != manifest.encoder.dim:
        raise IndexIntegrityError(f"{ppath}: column embedding has type {emb_type}, expected dim {manifest.encoder.dim}")
    if index.ntotal != entry.count or index.d != manifest.encoder.dim:
        raise IndexIntegrityError(
            f"{ipath}: index holds {index.ntotal} vectors of dim {index.d}, manifest says {entry.count} of dim {manifest.encoder.dim}"
        )
    row_ids = int64_column(table, "row_id")
    if len(np.unique(row_ids)) != len(row_ids):
        raise IndexIntegrityError(f"{ppath}: column row_id has duplicates")
    stored = index_ids(index)
    if stored is not None and not np.array_equal(np.sort(stored), np.sort(row_ids)):
        raise IndexIntegrityError(f"{ipath}: ids differ from {entry.passages} column row_id")


PASSAGE_COLUMNS = ["row_id", "id", "title", "text"]
PASSAGE_STORES = ("table", "mapped")


def _wants_embeddings(load_embeddings: bool | str, index) -> bool:
    """Asked for, or ("auto") needed because the index cannot give the same vectors back (PQ/SQ codes)."""
    from raggen.index.shard import exact_reconstruct

    return not exact_reconstruct(index) if load_embeddings == "auto" else bool(load_embeddings)


def _columns(embeddings: bool, passage_store: str = "table") -> list[str]:
    """Which parquet columns to read into the shard's table: all passage columns, or only ``row_id``
    when texts and vectors are read from cache files; ``embedding`` when wanted."""
    if passage_store == "mapped":
        return ["row_id"]
    return PASSAGE_COLUMNS + ["embedding"] if embeddings else list(PASSAGE_COLUMNS)


def _load(
    uri: str,
    version: str | None,
    s3_options,
    cache_dir,
    *,
    from_store: bool,
    load_embeddings: bool | str = True,
    shards: list[int] | None = None,
    keep_cached_versions: int | None = None,
    passage_store: str = "table",
) -> LoadedVersion:
    if load_embeddings not in (True, False, "auto"):
        raise ValueError(f"load_embeddings: True, False or 'auto', got {load_embeddings!r}")
    if passage_store not in PASSAGE_STORES:
        raise ValueError(f"passage_store: one of {PASSAGE_STORES}, got {passage_store!r}")
    store, vuri, expected = _version_store(uri, version, s3_options)
    manifest = _read_manifest_at(store, vuri, expected)
    numbers = list(range(len(manifest.shards))) if shards is None else [int(n) for n in shards]
    if any(n < 0 or n >= len(manifest.shards) for n in numbers):
        raise IndexIntegrityError(f"{vuri}: has {len(manifest.shards)} shards, asked for {numbers}")
    cache = None
    if is_s3_uri(vuri):
        cache = Path(cache_dir or default_cache_dir()) / vuri[len("s3://") :]
        cache.mkdir(parents=True, exist_ok=True)
        cache_mark_used(cache)
    loaded = LoadedVersion(
        uri=vuri,
        manifest=manifest,
        shard_numbers=numbers,
        s3_options=s3_options,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    mapped = not from_store and passage_store == "mapped"
    derived = derived_dir(vuri, cache, Path(cache_dir or default_cache_dir())) if mapped else None
    for n in numbers:
        entry = manifest.shards[n]
        ifile = _fetch_verified(store, vuri, entry.index, entry.index_sha256, cache, from_store=from_store)
        pfile = _fetch_verified(store, vuri, entry.passages, entry.passages_sha256, cache, from_store=from_store)
        index = _open_index(vuri, entry, ifile)
        embeddings = not from_store and _wants_embeddings(load_embeddings, index)
        columns = ["row_id"] if from_store else _columns(embeddings, passage_store)  # verify: ids only
        table, schema = _read_passages(vuri, entry, pfile, columns)
        _check_shard(vuri, manifest, entry, index, table, schema)
        shard = LoadedShard(entry=entry, passages=table, index_path=ifile.path, faiss_index=index)
        if mapped:
            shard.texts = open_blocks(pfile.path, entry.passages_sha256, entry.count, derived)
            if embeddings and "embedding" in schema.names:
                shard.vectors = open_vectors(pfile.path, entry.passages_sha256, entry.count, derived)
            pfile.check_unchanged()
        loaded.shards.append(shard)
    if from_store and shards is None and manifest.sparse is not None:  # verify: the sparse files' bytes too
        for f in manifest.sparse.files:
            _fetch_verified(store, vuri, f.name, f.sha256, cache, from_store=True)
    for kept in {d for d in (cache, derived) if d is not None}:
        if keep_cached_versions:
            evict_cached_versions(kept.parent, keep=keep_cached_versions, keep_names={kept.name})
    return loaded


def load_version(
    uri: str,
    version: str | None = None,
    *,
    s3_options: S3Options | Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    load_embeddings: bool | str = True,
    shards: list[int] | None = None,
    keep_cached_versions: int | None = 2,
    passage_store: str = "table",
) -> LoadedVersion:
    """Load and verify a version: ``uri`` is a root (LATEST is read when ``version`` is None) or a
    version folder. Every sha256, row count, vector count and dimension is checked first; an S3
    version is served from the local cache (``cache_dir``) when the cached file's sha256 matches.

    Memory: each FAISS index is opened once, memory-mapped from its verified file (the store's
    folder or the cache), and each parquet file is read through a memory map (the columns read are
    decoded into this process; see ``passage_store`` for keeping them out). ``load_embeddings``:
    True reads the stored ``embedding`` column, False never does (serving), "auto" only when the
    index cannot give the exact vectors back (PQ/SQ codes). ``shards``: only these shard numbers
    (a shard actor's share). ``keep_cached_versions``: after an S3 load, cached versions of the
    same root beyond the newest N (by last use) are deleted (None: keep all). ``passage_store``:
    "table" decodes id/title/text (and the embeddings) into each shard's table; "mapped" reads only
    ``row_id`` there and reads the rest from files derived into the cache: texts as compressed
    blocks (``passage_blocks``), embeddings as a ``.npy`` (``passage_vectors``), both read with
    ``pread``; the process then
    holds only what it reads (what shard actors use)."""
    loaded = _load(
        uri,
        version,
        s3_options,
        cache_dir,
        from_store=False,
        load_embeddings=load_embeddings,
        shards=shards,
        keep_cached_versions=keep_cached_versions,
        passage_store=passage_store,
    )
    m = loaded.manifest
    logger.info(
        "loaded index %s from %s: %d of %d shards, %d passages",
        m.version,
        loaded.uri,
        len(loaded.shards),
        len(m.shards),
        sum(s.entry.count for s in loaded.shards),
    )
    return loaded


def verify_version(uri: str, version: str | None = None, *, s3_options=None, cache_dir=None) -> Manifest:
    """Everything load_version checks, on the bytes in the store ``uri`` names: every file is
    streamed from the store and hashed (an S3 object on its way into the cache, which it then
    refreshes); a cached copy is never trusted. Returns the manifest; raises IndexIntegrityError."""
    return _load(uri, version, s3_options, cache_dir, from_store=True).manifest


def verify_index(
    uri: str,
    version: str | None = None,
    *,
    s3_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Manifest:
    """Check every checksum and count of a published version, on the bytes in the store ``uri``
    names (streamed from it; a local cache is never trusted); returns its manifest."""
    return verify_version(uri, version, s3_options=s3_options, cache_dir=cache_dir)
