"""The published-index contract: manifest.json, the LATEST pointer, checksums, shard parquet files.

Layout (DESIGN.md, **contract**)::

    <root>/LATEST                      -> "v20261123-104500-1a2b\\n"
    <root>/<version>/manifest.json
    <root>/<version>/shard-00000.faiss  shard-00000.parquet  ...

Publishing uploads the shard files, reads their checksums back, writes manifest.json, reads it
back, and moves LATEST last: the pointer update is the publish. A version folder without
manifest.json is an unfinished upload and is never loaded. Loading verifies every sha256 and every
count before anything is served and raises IndexIntegrityError (one line naming the file)
otherwise; since LATEST only ever points at verified versions, the previous version stays
loadable when a newer upload is partial or corrupt.

Passage parquet (one per shard): ``row_id`` int64 (the FAISS id), ``id`` string (passage id),
``title``, ``text``, and optionally ``embedding`` fixed_size_list<float32>[dim]. Embeddings are
stored because training recomputes doc scores q(x)·d(z) with gradient to the query encoder and
needs d(z) for the retrieved passages. Their cost is dim * 4 bytes per passage (768-d: 3 KiB;
21M DPR passages: ~64 GB, versus ~13 GB of text). Publish with ``store_embeddings=False`` to
drop them; readers then fall back to FAISS ``reconstruct`` (exact for Flat/HNSW, approximate
for PQ/SQ codes).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index.shard import deserialize_index, index_ids, normalize_metric
from raggen.storage import (
    LocalStore,
    S3Options,
    default_cache_dir,
    is_s3_uri,
    join_uri,
    open_store,
    sha256_bytes,
    sha256_file,
    store_sha256,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "LATEST"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def shard_file_names(shard: int) -> tuple[str, str]:
    """(index file, passages file) for shard number ``shard``: shard-00000.faiss / .parquet."""
    return f"shard-{shard:05d}.faiss", f"shard-{shard:05d}.parquet"


def new_version_name() -> str:
    """A sortable, collision-resistant version name: v<UTC date>-<time>-<4 hex>."""
    return time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def check_version_name(version: str) -> str:
    if not isinstance(version, str) or not _SAFE_NAME.match(version) or version == LATEST_NAME:
        raise ConfigError(f"version: must match [A-Za-z0-9][A-Za-z0-9._-]* and not be LATEST, got {version!r}")
    return version


# ------------------------------------------------------------------------------------------ the model


class EncoderInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name_or_path: str
    pooling: str
    dim: int = Field(gt=0)
    normalize: bool = False  # L2-normalised vectors; the query encoder must match (absent in older manifests)
    # how passages were tokenised: "pair" (title, text) as DPR, or "joined" "title . text" (older manifests: joined)
    passage_format: str = "joined"


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str
    index_sha256: str
    passages: str
    passages_sha256: str
    count: int = Field(ge=0)

    @field_validator("index", "passages")
    @classmethod
    def _relative_name(cls, name: str) -> str:
        # names are relative to the version folder; no sub-folders, no '..', no absolute paths
        if not _SAFE_NAME.match(name):
            raise ValueError(f"file name must be a plain relative name, got {name!r}")
        return name

    @field_validator("index_sha256", "passages_sha256")
    @classmethod
    def _hex_digest(cls, digest: str) -> str:
        if not _SHA256.match(digest):
            raise ValueError(f"must be 64 lowercase hex characters, got {digest!r}")
        return digest


class Manifest(BaseModel):
    """manifest.json, exactly the contract's fields (unknown fields are rejected)."""

    model_config = ConfigDict(extra="forbid")

    version: str
    created: str
    encoder: EncoderInfo
    metric: str
    faiss_factory: str
    num_passages: int = Field(ge=0)
    shards: list[ShardEntry]

    @field_validator("version")
    @classmethod
    def _version(cls, version: str) -> str:
        if not _SAFE_NAME.match(version) or version == LATEST_NAME:
            raise ValueError(f"must match [A-Za-z0-9][A-Za-z0-9._-]*, got {version!r}")
        return version

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        try:
            return normalize_metric(metric)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if not self.shards:
            raise ValueError("shards: at least one shard is required")
        total = sum(s.count for s in self.shards)
        if total != self.num_passages:
            raise ValueError(f"num_passages is {self.num_passages} but the shard counts sum to {total}")
        names = [n for s in self.shards for n in (s.index, s.passages)]
        if len(set(names)) != len(names) or MANIFEST_NAME in names:
            raise ValueError("shards: file names must be distinct (and not manifest.json)")
        return self

    def files(self) -> list[tuple[str, str]]:
        """Every (file name, sha256) the version holds besides manifest.json."""
        return [pair for s in self.shards for pair in ((s.index, s.index_sha256), (s.passages, s.passages_sha256))]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, data: bytes | str, source: str) -> "Manifest":
        """Parse; any problem -> IndexIntegrityError naming ``source`` and the first bad field."""
        try:
            return cls.model_validate(json.loads(data))
        except json.JSONDecodeError as exc:
            raise IndexIntegrityError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "manifest"
            raise IndexIntegrityError(f"{source}: field {where}: {err['msg']}") from None


def make_manifest(
    version: str,
    *,
    encoder_name_or_path: str,
    pooling: str,
    dim: int,
    metric: str,
    normalize: bool = False,
    faiss_factory: str,
    shard_files: list[tuple[Path, Path, int]],
    passage_format: str = "joined",
) -> Manifest:
    """A manifest for local shard files [(index path, parquet path, count)]; hashes them here."""
    shards = [
        ShardEntry(
            index=Path(ix).name,
            index_sha256=sha256_file(ix),
            passages=Path(px).name,
            passages_sha256=sha256_file(px),
            count=int(count),
        )
        for ix, px, count in shard_files
    ]
    return Manifest(
        version=check_version_name(version),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        encoder=EncoderInfo(name_or_path=encoder_name_or_path, pooling=pooling, dim=dim, normalize=normalize,
                            passage_format=passage_format),
        metric=metric,
        faiss_factory=faiss_factory,
        num_passages=sum(s.count for s in shards),
        shards=shards,
    )


# ------------------------------------------------------------------------------------------ passage parquet


def passages_table(
    row_ids: np.ndarray,
    ids: list[str] | np.ndarray,
    titles: list[str] | np.ndarray,
    texts: list[str] | np.ndarray,
    embeddings: np.ndarray | None = None,
) -> pa.Table:
    """The shard's passage table; ``embeddings`` (n, d) float32 becomes a fixed_size_list column."""
    columns = {
        "row_id": pa.array(np.asarray(row_ids, dtype=np.int64)),
        "id": pa.array([str(x) for x in ids], type=pa.string()),
        "title": pa.array([("" if x is None else str(x)) for x in titles], type=pa.string()),
        "text": pa.array([("" if x is None else str(x)) for x in texts], type=pa.string()),
    }
    if embeddings is not None:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        assert emb.ndim == 2 and emb.shape[0] == len(columns["row_id"]), f"embeddings: bad shape {emb.shape}"
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
    return pa.table(columns)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write to a temporary sibling, then os.replace (readers never see a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def embeddings_of(table: pa.Table) -> np.ndarray | None:
    """(n, d) float32 view of the ``embedding`` column, or None when it was not stored."""
    if "embedding" not in table.column_names:
        return None
    col = table.column("embedding").combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # empty tables stay chunked
        col = col.chunks[0] if col.num_chunks else pa.array([], type=col.type)
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), dim).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ publish


def publish_version(
    root_uri: str,
    manifest: Manifest,
    local_dir: str | os.PathLike,
    *,
    s3_options: S3Options | Mapping[str, Any] | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Manifest:
    """Upload ``local_dir``'s shard files as ``<root>/<version>/``, verify, then move LATEST.

    Raises IndexIntegrityError (LATEST untouched) if a read-back checksum differs from the manifest.
    """
    root = open_store(root_uri, s3_options)
    version = check_version_name(manifest.version)
    if root.exists(f"{version}/{MANIFEST_NAME}") and not overwrite:
        raise ConfigError(f"version: {version!r} is already published under {root_uri}")
    for name, _ in manifest.files():
        local = Path(local_dir, name)
        if not local.is_file():
            raise IndexIntegrityError(f"{local}: missing; cannot publish version {version}")
        root.upload_file(local, f"{version}/{name}")
    if verify:
        for name, expected in manifest.files():
            got = store_sha256(root, f"{version}/{name}")
            if got != expected:
                raise IndexIntegrityError(
                    f"{join_uri(root.uri, version, name)}: sha256 {got[:16]}... after upload differs from "
                    f"the manifest's {expected[:16]}...; LATEST not moved"
                )
    body = manifest.to_json().encode()
    root.write_bytes(f"{version}/{MANIFEST_NAME}", body)
    if verify and sha256_bytes(root.read_bytes(f"{version}/{MANIFEST_NAME}")) != sha256_bytes(body):
        raise IndexIntegrityError(f"{join_uri(root.uri, version, MANIFEST_NAME)}: read-back differs; LATEST not moved")
    root.write_bytes(LATEST_NAME, (version + "\n").encode())
    logger.info("published index version %s to %s (%d passages)", version, root_uri, manifest.num_passages)
    return manifest


def read_latest(root_uri: str, s3_options=None) -> str | None:
    """The version LATEST points at, or None when nothing was published yet."""
    root = open_store(root_uri, s3_options)
    if not root.exists(LATEST_NAME):
        return None
    return root.read_bytes(LATEST_NAME).decode("utf-8").strip() or None


def list_versions(root_uri: str, s3_options=None) -> list[str]:
    """Versions under ``root_uri`` that have a manifest.json (i.e. finished uploads), sorted."""
    names = open_store(root_uri, s3_options).list()
    return sorted({n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith("/" + MANIFEST_NAME)})


def set_latest(root_uri: str, version: str, *, s3_options=None, verify: bool = True) -> Manifest:
    """Point LATEST at ``version`` (e.g. a rollback) after verifying it loads."""
    manifest = verify_version(root_uri, version, s3_options=s3_options) if verify else None
    open_store(root_uri, s3_options).write_bytes(LATEST_NAME, (check_version_name(version) + "\n").encode())
    return manifest or read_manifest(root_uri, version, s3_options=s3_options)


# ------------------------------------------------------------------------------------------ load + verify


@dataclass
class LoadedShard:
    """One verified shard: its serialized index (uint8, as stored) and its passage table."""

    entry: ShardEntry
    index_bytes: np.ndarray
    passages: pa.Table

    def index(self):
        return deserialize_index(self.index_bytes)

    @property
    def has_embeddings(self) -> bool:
        return "embedding" in self.passages.column_names


@dataclass
class LoadedVersion:
    uri: str  # the version's folder / prefix
    manifest: Manifest
    shards: list[LoadedShard] = field(default_factory=list)

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
        latest = read_latest(uri, s3_options)
        if latest is None:
            raise IndexIntegrityError(f"{join_uri(root.uri, LATEST_NAME)}: missing (nothing published, and no manifest.json)")
        version = latest
    check_version_name(version)
    vuri = join_uri(root.uri, version)
    return open_store(vuri, s3_options), vuri, version


def resolve_version_uri(uri: str, version: str | None = None, *, s3_options=None) -> str:
    """The folder / prefix of ``version`` (LATEST when None; ``uri`` itself if it is a version folder)."""
    return _version_store(uri, version, s3_options)[1]


def _read_manifest_at(store, vuri: str, expected_version: str | None) -> Manifest:
    source = join_uri(vuri, MANIFEST_NAME)
    if not store.exists(MANIFEST_NAME):
        raise IndexIntegrityError(f"{source}: missing (unfinished or absent version)")
    manifest = Manifest.from_json(store.read_bytes(MANIFEST_NAME), source)
    if expected_version is not None and manifest.version != expected_version:
        raise IndexIntegrityError(f"{source}: field version is {manifest.version!r}, expected {expected_version!r}")
    return manifest


def read_manifest(uri: str, version: str | None = None, *, s3_options=None) -> Manifest:
    """The manifest of ``version`` (LATEST when None, or ``uri`` itself when it is a version folder)."""
    store, vuri, expected = _version_store(uri, version, s3_options)
    return _read_manifest_at(store, vuri, expected)


def _fetch_verified(store, vuri: str, name: str, expected: str, cache: Path | None) -> bytes:
    """The file's bytes after checking sha256; local stores are read in place, S3 via the cache."""
    source = join_uri(vuri, name)
    if not store.exists(name):
        raise IndexIntegrityError(f"{source}: missing")
    if isinstance(store, LocalStore):
        data = store.read_bytes(name)
    else:
        local = cache / name
        if not (local.is_file() and sha256_file(local) == expected):
            store.download_file(name, local)
        data = local.read_bytes()
    got = sha256_bytes(data)
    if got != expected:
        raise IndexIntegrityError(f"{source}: sha256 mismatch (expected {expected[:16]}..., got {got[:16]}..., {len(data)} bytes)")
    return data


def _check_shard(vuri: str, manifest: Manifest, entry: ShardEntry, index_bytes: np.ndarray, table: pa.Table) -> None:
    """Counts, dimensions and ids agree between manifest, parquet and index."""
    ppath, ipath = join_uri(vuri, entry.passages), join_uri(vuri, entry.index)
    missing = {"row_id", "id", "title", "text"} - set(table.column_names)
    if missing:
        raise IndexIntegrityError(f"{ppath}: missing column(s) {sorted(missing)}")
    if table.num_rows != entry.count:
        raise IndexIntegrityError(f"{ppath}: {table.num_rows} rows, manifest count is {entry.count}")
    emb_type = table.schema.field("embedding").type if "embedding" in table.column_names else None
    if emb_type is not None and getattr(emb_type, "list_size", None) != manifest.encoder.dim:
        raise IndexIntegrityError(f"{ppath}: column embedding has type {emb_type}, expected dim {manifest.encoder.dim}")
    try:
        index = deserialize_index(index_bytes)
    except RuntimeError as exc:
        raise IndexIntegrityError(f"{ipath}: not a readable FAISS index ({str(exc).strip().splitlines()[-1]})") from None
    if index.ntotal != entry.count or index.d != manifest.encoder.dim:
        raise IndexIntegrityError(
            f"{ipath}: index holds {index.ntotal} vectors of dim {index.d}, manifest says {entry.count} of dim {manifest.encoder.dim}"
        )
    row_ids = table.column("row_id").to_numpy()
    if len(np.unique(row_ids)) != len(row_ids):
        raise IndexIntegrityError(f"{ppath}: column row_id has duplicates")
    stored = index_ids(index)
    if stored is not None and not np.array_equal(np.sort(stored), np.sort(row_ids)):
        raise IndexIntegrityError(f"{ipath}: ids differ from {entry.passages} column row_id")


def load_version(
    uri: str,
    version: str | None = None,
    *,
    s3_options: S3Options | Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedVersion:
    """Load and verify a version: ``uri`` is a root (LATEST is read when ``version`` is None) or a
    version folder. Every sha256, row count, vector count and dimension is checked first."""
    store, vuri, expected = _version_store(uri, version, s3_options)
    manifest = _read_manifest_at(store, vuri, expected)
    cache = None
    if is_s3_uri(vuri):
        cache = Path(cache_dir or default_cache_dir()) / vuri[len("s3://") :]
        cache.mkdir(parents=True, exist_ok=True)
    loaded = LoadedVersion(uri=vuri, manifest=manifest)
    for entry in manifest.shards:
        index_bytes = np.frombuffer(_fetch_verified(store, vuri, entry.index, entry.index_sha256, cache), dtype=np.uint8)
        pbytes = _fetch_verified(store, vuri, entry.passages, entry.passages_sha256, cache)
        try:
            table = pq.read_table(io.BytesIO(pbytes))
        except (pa.ArrowInvalid, OSError) as exc:
            raise IndexIntegrityError(f"{join_uri(vuri, entry.passages)}: not a readable parquet file ({exc})") from None
        _check_shard(vuri, manifest, entry, index_bytes, table)
        loaded.shards.append(LoadedShard(entry=entry, index_bytes=index_bytes, passages=table))
    logger.info("loaded index %s from %s: %d shards, %d passages", manifest.version, vuri, len(manifest.shards), manifest.num_passages)
    return loaded


def verify_version(uri: str, version: str | None = None, *, s3_options=None, cache_dir=None) -> Manifest:
    """Everything load_version checks; returns the manifest (raises IndexIntegrityError otherwise)."""
    return load_version(uri, version, s3_options=s3_options, cache_dir=cache_dir).manifest
