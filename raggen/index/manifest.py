"""The published-index contract: manifest.json, the LATEST pointer, checksums, shard parquet files.

Layout (DESIGN.md, **contract**)::

    <root>/LATEST                      -> "v20261123-104500-1a2b\\n"
    <root>/<version>/manifest.json
    <root>/<version>/shard-00000.faiss  shard-00000.parquet  ...

Publishing (:func:`~raggen.index.publish.publish_version`) claims the version (``<version>/.raggen-publish``, created
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
:func:`~raggen.index.loading.verify_version` hashes the bytes in the store it names (streamed), never a cache.

This module holds the contract's names and the manifest model; ``publish`` (claims, the commit,
set-latest), ``latest`` (the LATEST pointer), ``loading`` (resolve, verify, load), ``version_cache``
(the local copy of S3 versions) and ``passage_table`` (the passage parquet) hold the rest.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index.shard import normalize_metric
from raggen.storage import join_uri, sha256_file

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
    # the model's prompts: before every passage it encoded, and before every question searching it
    # (callers whose query encoder sets no query_prefix use this one); older manifests: none
    query_prefix: str = ""
    passage_prefix: str = ""

    def pooling_conflict(self, name_or_path: str, pooling: str) -> str | None:
        """Why a query encoder (``name_or_path``, ``pooling``) cannot search these vectors: it is the
        model that encoded the passages, pooled otherwise (scores would be noise); None when it can
        (another model, e.g. DPR's question encoder, pairs as its recipe says)."""
        if name_or_path != self.name_or_path or pooling == self.pooling:
            return None
        return f"passages were {self.pooling}-pooled by {self.name_or_path}, but the query encoder, the same model, pools {pooling}"


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
    refine_k_factor: float | None = Field(
        None, ge=1, description="re-ranked indexes ('...,RFlat'): PQ candidates re-scored per hit (k x this)"
    )
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
        for prompt in ("query_prefix", "passage_prefix"):  # optional: written only for a model with prompts
            if not data["encoder"].get(prompt):
                data["encoder"].pop(prompt, None)
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
    query_prefix: str = "",
    passage_prefix: str = "",
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
            query_prefix=query_prefix,
            passage_prefix=passage_prefix,
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


# ------------------------------------------------------------------------------------------ reading one


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
