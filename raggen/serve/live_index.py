"""The live index of a Retriever replica: load a verified version, and the user_config that picks it.

Plain Python (no Ray Serve): :class:`LiveIndex` is one loaded, verified version;
:class:`~raggen.serve.index_holder.IndexHolder` swaps whole ones under a lock and can follow the
``LATEST`` pointer with a watcher thread; the Retriever deployment (:mod:`raggen.serve.deployments`)
drives it from ``reconfigure(user_config)`` (:class:`IndexUserConfig`).

Where a version's shards live follows the ``index.search`` settings (``SearchSettings``, the same
object train and eval open their index with): ``local`` loads them into the replica (memory-mapped);
``actors`` (or ``auto`` above its thresholds) searches them through a group of shard actors, the
query encoder staying in the replica. Either way the ``embedding`` column is never loaded
(serving needs none) and the version's tuned nprobe / efSearch apply unless the settings give them.

Shard actors are shared: every replica of one version (same version folder and actor settings)
borrows ONE group from the cluster's ``ShardGroupRegistry`` (a detached actor,
``raggen.index.actors``), which starts it on the first request, lends it to the others and ends it
when the last replica has given it back. A hot swap starts (or borrows) and verifies the new
version's group beside the old one, swaps atomically, and gives the old one back only when no
in-flight request uses it any more (readers pin it with
:meth:`~raggen.serve.index_holder.IndexHolder.use`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raggen.errors import IndexIntegrityError, RaggenError
from raggen.index import (
    SearchSettings,
    list_versions,
    open_index,
    read_latest,
    read_manifest,
)
from raggen.index.open_search import search_plan
from raggen.index.shared_groups import open_shared_group
from raggen.retrieval import RetrievalSettings, with_retrieval

# a child of Serve's logger, so swaps and refusals land in the replica's log file next to Serve's own
log = logging.getLogger("ray.serve").getChild(__name__)


class NoIndexError(RaggenError):
    """The retriever has no verified index to serve from (yet)."""


# ---------------------------------------------------------------------------------- live index


@dataclass(frozen=True)
class LiveIndex:
    """One verified, loaded index version; replaced as a whole, never mutated."""

    root: str
    version: str
    index: Any  # raggen.index.ShardedIndex
    num_passages: int
    loaded_at: float
    query_prefix: str = ""  # the version's recorded query prompt (used unless the query encoder sets one)

    @property
    def backend(self) -> str:
        """Where the shards are searched: "local" (this process) or "actors" (a shard actor group)."""
        return str(getattr(self.index, "backend_kind", "local"))

    def close(self) -> None:
        """Release the index once nothing searches it: a shard actor group is given back (ended
        with its last borrower); a local index's thread pool stops."""
        close = getattr(self.index, "close", None)
        if close is not None:
            close()


def load_live_index(
    root: str,
    version: str | None,
    *,
    s3: dict | None = None,
    expect_dim: int | None = None,
    expect_encoder: tuple[str, str] | None = None,
    settings: SearchSettings | None = None,
) -> LiveIndex:
    """Load ``version`` (None: the one LATEST names) of the index at ``root``, every checksum verified.

    ``settings`` (``index.search``; None: ``mode="local"``) say where the shards live: in this
    process, or (``actors``, ``auto`` above its thresholds) in the cluster's shared shard actor
    group of this version (started and verified on first use, see the module docstring). Raises
    IndexIntegrityError on a partial/corrupt version or one whose vectors the query encoder cannot
    search (dimension mismatch, or ``expect_encoder`` = (the query encoder's model, its pooling)
    naming the model the passages were encoded with, pooled otherwise); all are found before any
    shard is loaded or actor started.
    """
    settings = settings if settings is not None else SearchSettings(mode="local")
    vuri, manifest, actors = search_plan(root, version, settings, s3)  # LATEST read once, here
    dim = int(manifest.encoder.dim)
    if expect_dim is not None and dim != expect_dim:
        raise IndexIntegrityError(
            f"{root} version {manifest.version}: index vectors are {dim}-d but the query encoder gives {expect_dim}-d"
        )
    conflict = manifest.encoder.pooling_conflict(*expect_encoder) if expect_encoder is not None else None
    if conflict:
        raise IndexIntegrityError(f"{root} version {manifest.version}: {conflict}")
    if actors:
        index = open_shared_group(vuri, settings=settings, s3_options=s3, manifest=manifest, load_embeddings=False)
    else:
        index = open_index(
            vuri, settings=settings.model_copy(update={"mode": "local"}), s3_options=s3, load_embeddings=False
        )
    # dense | sparse | hybrid per request: the version's BM25 index (verified) beside the shards
    index = with_retrieval(
        index, vuri, RetrievalSettings(), s3_options=s3, load_sparse_index=manifest.sparse is not None
    )
    return LiveIndex(
        root=root,
        version=str(manifest.version),
        index=index,
        num_passages=int(manifest.num_passages),
        loaded_at=time.time(),
        query_prefix=manifest.encoder.query_prefix,
    )


def read_latest_version(root: str, *, s3: dict | None = None) -> str | None:
    """The version name the ``LATEST`` pointer next to the versions holds (None: no pointer)."""
    return read_latest(root, s3_options=s3)


def versions_newest_first(root: str, *, s3: dict | None = None) -> list[str]:
    """The versions under ``root`` whose manifest reads, newest first (``created``, then the name:
    what "newer" means for LATEST). Only manifests are read, not shards."""
    dated = []
    for name in list_versions(root, s3_options=s3):
        try:
            manifest = read_manifest(root, name, s3_options=s3)
        except IndexIntegrityError as exc:
            log.warning("index fallback: skipping %s/%s: %s", root, name, exc)
            continue
        dated.append((_created(manifest.created), name))
    return [name for _, name in sorted(dated, reverse=True)]


def _created(text: str | None) -> datetime:
    try:
        when = datetime.fromisoformat((text or "").replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


class IndexUserConfig(BaseModel):
    """The Retriever's ``user_config``: which index to serve; changing it hot-swaps the index."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(min_length=1, description="root folder or s3:// prefix holding versions and LATEST")
    version: str | None = Field(None, description="a version name; None follows LATEST")
    watch_latest: bool = False
    watch_interval_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> IndexUserConfig:
        if self.watch_latest and self.version is not None:
            raise ValueError("version pins one version while watch_latest follows LATEST: set only one")
        return self


def load_for_swap(
    root: str,
    version: str | None,
    *,
    s3: dict | None,
    expect_dim: int,
    expect_encoder: tuple[str, str] | None = None,
    settings: SearchSettings | None = None,
) -> LiveIndex:
    """:func:`load_live_index` with keyword-only settings, for ``functools.partial`` in a replica."""
    return load_live_index(
        root, version, s3=s3, expect_dim=expect_dim, expect_encoder=expect_encoder, settings=settings
    )
