"""The published-index contract: manifest.json, the LATEST pointer, checksums, shard parquet files.

Layout (DESIGN.md, **contract**)::

    <root>/LATEST                      -> "v20261123-104500-1a2b\\n"
    <root>/<version>/manifest.json
    <root>/<version>/shard-00000.faiss  shard-00000.parquet  ...

Publishing (:func:`publish_version`) claims the version (``<version>/.raggen-publish``, created
with a conditional write), uploads the shard files, reads their checksums back from the store and
creates manifest.json with a conditional write (``IfNoneMatch="*"`` on S3, the root's lock on a
folder): the manifest is the version's commit point, so of two writers of one version name exactly
one wins, and a version folder without manifest.json is an unfinished upload that is never listed
or loaded. LATEST moves last, with ``IfMatch=<etag>``, and only forward: to a version whose
manifest was ``created`` later (then: a larger version name) than the one it names, unless a
rollback is asked for. ``overwrite`` never touches the version LATEST names.

A publisher killed mid-upload leaves its claim behind; the claim names its pid and host, so a rerun
on the same host takes it over at once when that pid is gone (elsewhere after ``CLAIM_TTL_S``
without a heartbeat; the publisher refreshes its claim after every file).

Loading verifies every sha256 and every count before anything is served and raises
IndexIntegrityError (one line naming the file) otherwise; since LATEST only ever points at
verified versions, the previous version stays loadable when a newer upload is partial or corrupt.
:func:`verify_version` hashes the bytes in the store it names (streamed), never a cache.

Passage parquet (one per shard): ``row_id`` int64 (the FAISS id), ``id`` string (passage id),
``title``, ``text``, and optionally ``embedding`` fixed_size_list<float32>[dim]. Embeddings are
stored because training recomputes doc scores q(x)·d(z) with gradient to the query encoder and
needs d(z) for the retrieved passages. Their cost is dim * 4 bytes per passage (768-d: 3 KiB;
21M DPR passages: ~64 GB, versus ~13 GB of text). Publish with ``store_embeddings=False`` to
drop them; readers then fall back to FAISS ``reconstruct`` (exact for Flat/HNSW, approximate
for PQ/SQ codes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index.shard import index_ids, normalize_metric
from raggen.storage import (
    AtomicFile,
    ChecksumMismatch,
    LocalStore,
    PreconditionFailed,
    S3Options,
    Store,
    copy_to_local,
    default_cache_dir,
    is_s3_uri,
    iter_file_chunks,
    join_uri,
    open_store,
    sha256_bytes,
    sha256_chunks,
    sha256_file,
    store_sha256,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "LATEST"
CLAIM_NAME = ".raggen-publish"  # <version>/.raggen-publish: who is publishing that version
CLAIM_TTL_S = 3600.0  # a claim from another host without a heartbeat for this long is stale
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


class SearchDefaults(BaseModel):
    """The version's search parameters, chosen at build time (``raggen.index.tuning``) from a
    recall target on held-out queries; a reader uses them unless told otherwise (older manifests
    have none: FAISS's defaults, nprobe 1 / efSearch 16)."""

    model_config = ConfigDict(extra="forbid")

    nprobe: int | None = Field(None, ge=1)  # IVF lists probed
    ef_search: int | None = Field(None, ge=1)  # HNSW efSearch
    # how they were chosen: recall@k at that setting and at the exhaustive one, the target
    recall: float | None = None
    max_recall: float | None = None
    target_recall: float | None = None
    k: int | None = None
    num_queries: int | None = None


class SparseFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    sha256: str

    @field_validator("name")
    @classmethod
    def _relative_name(cls, name: str) -> str:
        return ShardEntry._relative_name(name)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, digest: str) -> str:
        return ShardEntry._hex_digest(digest)


class SparseEntry(BaseModel):
    """The optional sparse (BM25) index beside the shards (``raggen.index.sparse``): its files,
    the number of documents (every passage) and how it was built."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["bm25"] = "bm25"
    files: list[SparseFile] = Field(min_length=1)
    count: int = Field(ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


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
    search_defaults: SearchDefaults | None = None  # optional: absent in older manifests
    sparse: SparseEntry | None = None  # optional: a BM25 index beside the shards

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
    def _consistent(self) -> Manifest:
        if not self.shards:
            raise ValueError("shards: at least one shard is required")
        total = sum(s.count for s in self.shards)
        if total != self.num_passages:
            raise ValueError(f"num_passages is {self.num_passages} but the shard counts sum to {total}")
        names = [n for s in self.shards for n in (s.index, s.passages)] + [
            f.name for f in (self.sparse.files if self.sparse else [])
        ]
        if self.sparse is not None and self.sparse.count != self.num_passages:
            raise ValueError(f"sparse.count is {self.sparse.count} but num_passages is {self.num_passages}")
        if len(set(names)) != len(names) or MANIFEST_NAME in names:
            raise ValueError("shards: file names must be distinct (and not manifest.json)")
        return self

    def files(self) -> list[tuple[str, str]]:
        """Every (file name, sha256) the version holds besides manifest.json."""
        dense = [pair for s in self.shards for pair in ((s.index, s.index_sha256), (s.passages, s.passages_sha256))]
        return dense + [(f.name, f.sha256) for f in (self.sparse.files if self.sparse else [])]

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        if data.get("search_defaults") is None:
            data.pop("search_defaults", None)  # a version without them reads exactly as before
        else:
            data["search_defaults"] = {k: v for k, v in data["search_defaults"].items() if v is not None}
        if data.get("sparse") is None:
            data.pop("sparse", None)
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, data: bytes | str, source: str) -> Manifest:
        """Parse; any problem -> IndexIntegrityError naming ``source`` and the first bad field."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                data = bytes(data).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise IndexIntegrityError(
                    f"{source}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
                ) from None
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
    search_defaults: SearchDefaults | Mapping[str, Any] | None = None,
    sparse_files: list[Path] | None = None,
    sparse_params: Mapping[str, Any] | None = None,
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
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        encoder=EncoderInfo(
            name_or_path=encoder_name_or_path,
            pooling=pooling,
            dim=dim,
            normalize=normalize,
            passage_format=passage_format,
        ),
        metric=metric,
        faiss_factory=faiss_factory,
        num_passages=sum(s.count for s in shards),
        shards=shards,
        search_defaults=SearchDefaults.model_validate(search_defaults) if search_defaults is not None else None,
        sparse=None
        if not sparse_files
        else SparseEntry(
            files=[SparseFile(name=Path(p).name, sha256=sha256_file(p)) for p in sparse_files],
            count=sum(s.count for s in shards),
            params=dict(sparse_params or {}),
        ),
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
    """Write through :class:`raggen.storage.AtomicFile` (readers never see a half-written file)."""
    with AtomicFile(path, "wb", compress=False) as f:
        pq.write_table(table, f)


def embeddings_of(table: pa.Table) -> np.ndarray | None:
    """(n, d) float32 view of the ``embedding`` column, or None when it was not stored."""
    if "embedding" not in table.column_names:
        return None
    col = table.column("embedding").combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # empty tables stay chunked
        col = col.chunks[0] if col.num_chunks else pa.array([], type=col.type)
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), dim).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ claims


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Claim:
    """``<version>/.raggen-publish``: this writer is publishing that version (created conditionally)."""

    def __init__(self, root: Store, version: str):
        self.root, self.version, self.rel = root, version, f"{version}/{CLAIM_NAME}"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
        self.etag: str | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                           "started": getattr(self, "started", now), "updated": now}).encode()  # fmt: skip

    @staticmethod
    def _stale(info: dict) -> bool:
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return not _pid_alive(info["pid"])
        return time.time() - float(info.get("updated", 0)) > CLAIM_TTL_S

    def acquire(self) -> None:
        self.started = time.time()
        where = join_uri(self.root.uri, self.rel)
        for _ in range(20):
            try:
                self.etag = self.root.write_bytes(self.rel, self._body(), if_none_match=True)
                return
            except PreconditionFailed:
                pass
            try:
                data, etag = self.root.read_with_etag(self.rel)
                info = json.loads(data)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except ValueError:
                info, etag = {}, None
            if etag is not None and not self._stale(info):
                raise ConfigError(
                    f"version: {self.version!r} is being published under {self.root.uri} by pid "
                    f"{info.get('pid')} on {info.get('host')} ({where})"
                )
            logger.warning("%s: taking over a stale claim of pid %s on %s", where, info.get("pid"), info.get("host"))
            try:
                self.etag = (
                    self.root.write_bytes(self.rel, self._body(), if_match=etag)
                    if etag
                    else self.root.write_bytes(self.rel, self._body())
                )
                return
            except PreconditionFailed:
                continue
        raise ConfigError(f"version: could not claim {where} (too many concurrent writers)")

    def heartbeat(self) -> None:
        """Refresh the claim; fails if another writer took it over (then this one must stop)."""
        try:
            self.etag = self.root.write_bytes(self.rel, self._body(), if_match=self.etag)
        except PreconditionFailed:
            raise ConfigError(
                f"version: lost the claim on {self.version!r} under {self.root.uri} to another "
                "writer; stopped before writing its manifest"
            ) from None

    def release(self) -> None:
        try:
            data, _ = self.root.read_with_etag(self.rel)
            if json.loads(data).get("owner") == self.owner:
                self.root.delete_file(self.rel)
        except (FileNotFoundError, ValueError):
            pass
        except Exception as exc:  # noqa: BLE001 - a leftover claim is harmless: reruns take stale ones over
            logger.warning("%s: could not remove the publishing claim (%s)", join_uri(self.root.uri, self.rel), exc)


# ------------------------------------------------------------------------------------------ publish


def publish_version(
    root_uri: str,
    manifest: Manifest,
    local_dir: str | os.PathLike,
    *,
    s3_options: S3Options | Mapping[str, Any] | None = None,
    verify: bool = True,
    overwrite: bool = False,
    move_latest: bool = True,
    rollback: bool = False,
) -> Manifest:
    """Upload ``local_dir``'s shard files as ``<root>/<version>/``, verify, commit the manifest,
    then move LATEST forward (see the module docstring).

    Raises ConfigError when the version exists (unless ``overwrite``; never for the version LATEST
    names) or another writer is publishing it, and IndexIntegrityError (nothing committed, LATEST
    untouched) if a read-back checksum differs from the manifest. ``move_latest=False`` publishes
    without touching LATEST; ``rollback=True`` lets LATEST move to an older version.
    """
    root = open_store(root_uri, s3_options)
    version = check_version_name(manifest.version)
    mrel = f"{version}/{MANIFEST_NAME}"
    for name, _ in manifest.files():
        if not Path(local_dir, name).is_file():
            raise IndexIntegrityError(f"{Path(local_dir, name)}: missing; cannot publish version {version}")
    _check_not_published(root, version, overwrite)
    claim = _Claim(root, version)
    claim.acquire()
    try:
        old = _check_not_published(root, version, overwrite)  # again, now that the version is ours
        if old is not None:
            root.delete_file(mrel)  # un-commit the old version (never LATEST's) before replacing its files
        for name, _ in manifest.files():
            root.upload_file(Path(local_dir, name), f"{version}/{name}")
            claim.heartbeat()
        if verify:
            for name, expected in manifest.files():
                got = store_sha256(root, f"{version}/{name}")
                if got != expected:
                    raise IndexIntegrityError(
                        f"{join_uri(root.uri, version, name)}: sha256 {got[:16]}... after upload differs from "
                        f"the manifest's {expected[:16]}...; LATEST not moved"
                    )
        claim.heartbeat()
        body = manifest.to_json().encode()
        try:
            root.write_bytes(mrel, body, if_none_match=True)  # the commit point
        except PreconditionFailed:
            raise ConfigError(
                f"version: {version!r} was published under {root_uri} by another writer meanwhile"
            ) from None
        if verify and sha256_bytes(root.read_bytes(mrel)) != sha256_bytes(body):
            raise IndexIntegrityError(
                f"{join_uri(root.uri, version, MANIFEST_NAME)}: read-back differs; LATEST not moved"
            )
        if old is not None:
            kept = {n for n, _ in manifest.files()}
            for name in (n for n, _ in old.files() if n not in kept):  # files only the replaced manifest named
                root.delete_file(f"{version}/{name}")
    finally:
        claim.release()
    logger.info("published index version %s to %s (%d passages)", version, root_uri, manifest.num_passages)
    if move_latest:
        advance_latest(root, manifest, rollback=rollback)
    return manifest


def _check_not_published(root: Store, version: str, overwrite: bool) -> Manifest | None:
    """None when ``version`` has no manifest; its manifest when ``overwrite`` may replace it."""
    if not root.exists(f"{version}/{MANIFEST_NAME}"):
        return None
    if not overwrite:
        raise ConfigError(f"version: {version!r} is already published under {root.uri}")
    if _read_latest(root) == version:
        raise ConfigError(
            f"version: {version!r} is the version LATEST names under {root.uri}; overwrite never "
            "replaces the live version: publish under a new name"
        )
    try:
        return _read_manifest_at(root, root.uri, None, rel=f"{version}/{MANIFEST_NAME}")
    except IndexIntegrityError:
        return Manifest.model_construct(shards=[])  # unreadable: replace it, delete nothing else


def _age_key(manifest: Manifest) -> tuple[datetime, str]:
    """What "newer" means for LATEST: the manifest's ``created`` time, then the version name."""
    try:
        created = datetime.fromisoformat(manifest.created.replace("Z", "+00:00"))
        if created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)
    except ValueError:
        created = datetime.min.replace(tzinfo=timezone.utc)
    return created, manifest.version


def advance_latest(root: Store | str, manifest: Manifest, *, rollback: bool = False, s3_options=None) -> bool:
    """Point LATEST at ``manifest.version`` unless it names a newer version (or ``rollback``).

    A compare-and-swap loop: LATEST is read with its etag and replaced with ``if_match`` (created
    with ``if_none_match`` when absent), so of concurrent movers none is lost and LATEST never
    moves back. Returns True when LATEST names the version afterwards, False when it was left on
    a newer one. A LATEST whose manifest cannot be read is replaced (it serves nothing).
    """
    root = open_store(root, s3_options) if isinstance(root, str) else root
    body = (manifest.version + "\n").encode()
    for _ in range(100):
        try:
            data, etag = root.read_with_etag(LATEST_NAME)
        except FileNotFoundError:
            data, etag = None, None
        if data is not None:
            current = _decode_latest(root, data, strict=False)
            if current == manifest.version:
                return True
            if current is not None and not rollback:
                try:
                    newer = _read_manifest_at(root, root.uri, current, rel=f"{current}/{MANIFEST_NAME}")
                except IndexIntegrityError as exc:
                    logger.warning("LATEST names %s, which does not load (%s): replacing it", current, exc)
                else:
                    if _age_key(newer) > _age_key(manifest):
                        logger.warning("LATEST stays at %s under %s: it is newer than %s (created %s vs %s); "
                                       "pass rollback=True to move it back", current, root.uri, manifest.version,
                                       newer.created, manifest.created)  # fmt: skip
                        return False
        try:
            if etag is None:
                root.write_bytes(LATEST_NAME, body, if_none_match=True)
            else:
                root.write_bytes(LATEST_NAME, body, if_match=etag)
            return True
        except PreconditionFailed:
            time.sleep(0.01)  # another writer moved it: read again
    raise ConfigError(f"{join_uri(root.uri, LATEST_NAME)}: too many concurrent writers; LATEST not moved")


def _decode_latest(root: Store, data: bytes, *, strict: bool = True) -> str | None:
    source = join_uri(root.uri, LATEST_NAME)
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        if not strict:
            return None
        raise IndexIntegrityError(
            f"{source}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    if not name:
        return None
    if not _SAFE_NAME.match(name) or name == LATEST_NAME:
        if not strict:
            return None
        raise IndexIntegrityError(f"{source}: names an invalid version {name[:80]!r}")
    return name


def _read_latest(root: Store) -> str | None:
    try:
        return _decode_latest(root, root.read_bytes(LATEST_NAME))
    except FileNotFoundError:
        return None


def read_latest(root_uri: str, s3_options=None) -> str | None:
    """The version LATEST points at, or None when nothing was published yet."""
    return _read_latest(open_store(root_uri, s3_options))


def list_versions(root_uri: str, s3_options=None) -> list[str]:
    """Versions under ``root_uri`` that have a manifest.json (i.e. finished uploads), sorted."""
    names = open_store(root_uri, s3_options).list()
    return sorted({n.split("/")[0] for n in names
                   if n.count("/") == 1 and n.endswith("/" + MANIFEST_NAME) and _SAFE_NAME.match(n.split("/")[0])})  # fmt: skip


def set_latest(
    root_uri: str, version: str, *, s3_options=None, verify: bool = True, rollback: bool = False
) -> Manifest:
    """Point LATEST at ``version`` after verifying it (every checksum, read from the store).

    Moving LATEST to a version older than the one it names (by ``created``, then name) is a
    rollback and needs ``rollback=True``; otherwise it is a ConfigError and LATEST stays."""
    check_version_name(version)
    manifest = (
        verify_version(root_uri, version, s3_options=s3_options)
        if verify
        else read_manifest(root_uri, version, s3_options=s3_options)
    )
    if not advance_latest(open_store(root_uri, s3_options), manifest, rollback=rollback):
        current = read_latest(root_uri, s3_options)
        raise ConfigError(
            f"LATEST: {version!r} is older than {current!r}, which LATEST names under {root_uri}; "
            "moving back is a rollback: pass rollback=True (--rollback)"
        )
    return manifest


# ------------------------------------------------------------------------------------------ load + verify


@dataclass
class LoadedShard:
    """One verified shard: its FAISS index, opened once (memory-mapped from the store's folder or
    the local cache where the type allows, see ``shard.open_index_file``), and its passage table
    (read with a memory map; without the ``embedding`` column unless it was asked for)."""

    entry: ShardEntry
    passages: pa.Table
    index_path: Path
    faiss_index: Any = field(default=None, repr=False)

    def index(self):
        """The opened FAISS index (the same object every call: never deserialized twice)."""
        return self.faiss_index

    @property
    def index_bytes(self) -> np.ndarray:
        """The serialized index as stored: a read-only memory map of the file."""
        return _mapped(self.index_path)

    @property
    def has_embeddings(self) -> bool:
        return "embedding" in self.passages.column_names


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


def _read_manifest_at(store, vuri: str, expected_version: str | None, *, rel: str = MANIFEST_NAME) -> Manifest:
    source = join_uri(store.uri, rel)
    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        raise IndexIntegrityError(f"{source}: missing (unfinished or absent version)") from None
    manifest = Manifest.from_json(data, source)
    if expected_version is not None and manifest.version != expected_version:
        raise IndexIntegrityError(f"{source}: field version is {manifest.version!r}, expected {expected_version!r}")
    return manifest


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


def _open_index(vuri: str, manifest: Manifest, entry: ShardEntry, file: _Verified):
    """The shard's FAISS index, opened once from its verified file (memory-mapped)."""
    from raggen.index.shard import open_index_file

    try:
        index = open_index_file(file.path, ivf="IVF" in manifest.faiss_factory.upper())
    except RuntimeError as exc:
        raise IndexIntegrityError(
            f"{join_uri(vuri, entry.index)}: not a readable FAISS index ({str(exc).strip().splitlines()[-1]})"
        ) from None
    file.check_unchanged()
    return index


def _read_passages(
    vuri: str, entry: ShardEntry, file: _Verified, columns: list[str] | None
) -> tuple[pa.Table, pa.Schema]:
    """The verified parquet file read with a memory map, only ``columns`` (None: all)."""
    try:
        schema = pq.read_schema(file.path, memory_map=True)
        cols = None if columns is None else [c for c in columns if c in schema.names]
        table = pq.read_table(file.path, columns=cols, memory_map=True)
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
    row_ids = table.column("row_id").to_numpy()
    if len(np.unique(row_ids)) != len(row_ids):
        raise IndexIntegrityError(f"{ppath}: column row_id has duplicates")
    stored = index_ids(index)
    if stored is not None and not np.array_equal(np.sort(stored), np.sort(row_ids)):
        raise IndexIntegrityError(f"{ipath}: ids differ from {entry.passages} column row_id")


PASSAGE_COLUMNS = ["row_id", "id", "title", "text"]


def _columns(load_embeddings: bool | str, index) -> list[str] | None:
    """Which parquet columns to read: all with embeddings; without them when not asked for, or
    ("auto") when the index gives the same vectors back (Flat codes)."""
    from raggen.index.shard import exact_reconstruct

    if load_embeddings == "auto":
        load_embeddings = not exact_reconstruct(index)
    return None if load_embeddings else PASSAGE_COLUMNS


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
) -> LoadedVersion:
    if load_embeddings not in (True, False, "auto"):
        raise ValueError(f"load_embeddings: True, False or 'auto', got {load_embeddings!r}")
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
    for n in numbers:
        entry = manifest.shards[n]
        ifile = _fetch_verified(store, vuri, entry.index, entry.index_sha256, cache, from_store=from_store)
        pfile = _fetch_verified(store, vuri, entry.passages, entry.passages_sha256, cache, from_store=from_store)
        index = _open_index(vuri, manifest, entry, ifile)
        columns = ["row_id"] if from_store else _columns(load_embeddings, index)  # verify: the checks' column only
        table, schema = _read_passages(vuri, entry, pfile, columns)
        _check_shard(vuri, manifest, entry, index, table, schema)
        loaded.shards.append(LoadedShard(entry=entry, passages=table, index_path=ifile.path, faiss_index=index))
    if from_store and shards is None and manifest.sparse is not None:  # verify: the sparse files' bytes too
        for f in manifest.sparse.files:
            _fetch_verified(store, vuri, f.name, f.sha256, cache, from_store=True)
    if cache is not None and keep_cached_versions:
        evict_cached_versions(cache.parent, keep=keep_cached_versions, keep_names={cache.name})
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
) -> LoadedVersion:
    """Load and verify a version: ``uri`` is a root (LATEST is read when ``version`` is None) or a
    version folder. Every sha256, row count, vector count and dimension is checked first; an S3
    version is served from the local cache (``cache_dir``) when the cached file's sha256 matches.

    Memory: each FAISS index is opened once, memory-mapped from its verified file (the store's
    folder or the cache), and each parquet file is read with a memory map. ``load_embeddings``:
    True reads the stored ``embedding`` column, False never does (serving), "auto" only when the
    index cannot give the exact vectors back (PQ/SQ codes). ``shards``: only these shard numbers
    (a shard actor's share). ``keep_cached_versions``: after an S3 load, cached versions of the
    same root beyond the newest N (by last use) are deleted (None: keep all)."""
    loaded = _load(
        uri,
        version,
        s3_options,
        cache_dir,
        from_store=False,
        load_embeddings=load_embeddings,
        shards=shards,
        keep_cached_versions=keep_cached_versions,
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


# ------------------------------------------------------------------------------------------ the local cache

CACHE_MARKER = ".raggen-cache"  # in a cached version's folder: raggen made it, and when it was last used
CACHE_GRACE_S = 60.0  # a version used this recently is never evicted (another process may be loading it)


def cache_mark_used(version_dir: Path) -> None:
    """Record that this cached version is in use now (eviction keeps the most recently used)."""
    from raggen.storage import atomic_write_bytes

    atomic_write_bytes(
        version_dir / CACHE_MARKER,
        json.dumps({"last_used": time.time(), "pid": os.getpid(), "host": socket.gethostname()}).encode(),
    )


def _last_used(version_dir: Path) -> float | None:
    try:
        return float(json.loads((version_dir / CACHE_MARKER).read_text())["last_used"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evict_cached_versions(root_dir: Path, *, keep: int = 2, keep_names: set[str] = frozenset()) -> list[str]:
    """Delete cached versions under ``root_dir`` (one root's cache folder) beyond the ``keep`` most
    recently used; only folders raggen made (their marker), never ``keep_names`` nor one used in the
    last ``CACHE_GRACE_S``. A process still serving an evicted version keeps its memory maps (the
    files are unlinked, not truncated). Returns the evicted names."""
    import shutil

    from raggen.storage import FileLock

    if not root_dir.is_dir():
        return []
    evicted = []
    with FileLock(root_dir / f"{CACHE_MARKER}.lock", timeout=30.0, what=f"index cache {root_dir}"):
        dated = sorted(
            ((t, d) for d in root_dir.iterdir() if d.is_dir() and (t := _last_used(d)) is not None), reverse=True
        )
        now = time.time()
        for _, d in dated[max(keep, 0) :]:
            t = _last_used(d)  # again: another process may have just marked it
            if d.name in keep_names or t is None or now - t < CACHE_GRACE_S:
                continue
            shutil.rmtree(d, ignore_errors=True)
            evicted.append(d.name)
    if evicted:
        logger.info("index cache %s: evicted %s (keeping the %d most recently used)", root_dir, evicted, keep)
    return evicted


def verify_version(uri: str, version: str | None = None, *, s3_options=None, cache_dir=None) -> Manifest:
    """Everything load_version checks, on the bytes in the store ``uri`` names: every file is
    streamed from the store and hashed (an S3 object on its way into the cache, which it then
    refreshes); a cached copy is never trusted. Returns the manifest; raises IndexIntegrityError."""
    return _load(uri, version, s3_options, cache_dir, from_store=True).manifest
