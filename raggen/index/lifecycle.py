"""Index lifecycle on a published root (folder or S3 prefix): list versions, move LATEST, remove one.

Pure functions of ``(uri, s3_options)`` over :mod:`raggen.index.manifest` (which owns the
contract: conditional writes, LATEST forward-only with an explicit rollback, ``verify_version``);
nothing here re-implements those rules. ``raggen index list | set-latest | rm`` call these.

Removing a version (:func:`remove_version`) deletes its ``manifest.json`` first: from then on the
version is no longer listed and no reader loads it (a version without a manifest is an unfinished
upload); only then are the files its manifest named deleted. Files it did not name (somebody
else's) stay. The version LATEST names is never removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index.latest import _read_latest, list_versions
from raggen.index.manifest import (
    CLAIM_NAME,
    MANIFEST_NAME,
    Manifest,
    _read_manifest_at,
    check_version_name,
)
from raggen.index.publish import set_latest
from raggen.storage import LocalStore, Store, join_uri, open_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    """One row of ``raggen index list``: a version whose manifest.json exists."""

    version: str
    created: str | None
    num_passages: int | None
    num_shards: int | None
    encoder: str | None  # name_or_path
    pooling: str | None
    dim: int | None
    size_bytes: int  # manifest.json + every file it names, as stored
    latest: bool  # LATEST names it
    error: str | None = None  # the manifest does not read (then the manifest fields are None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sizes(store: Store, rel: str) -> dict[str, int]:
    """{name relative to ``rel``: size in bytes} of every stored file under ``rel``."""
    if isinstance(store, LocalStore):
        return {n[len(rel) + 1 :]: store.local_path(n).stat().st_size for n in store.list(rel)}
    return {n[len(rel) + 1 :]: size for n, size, _ in store.list_with_info(rel)}  # S3Store


def _manifest_of(root: Store, version: str) -> Manifest:
    return _read_manifest_at(root, join_uri(root.uri, version), version, rel=f"{version}/{MANIFEST_NAME}")


def list_index(uri: str, *, s3_options: Mapping[str, Any] | None = None) -> list[VersionInfo]:
    """Every published version under the root ``uri`` (oldest first by ``created``, then name).

    A version whose manifest does not read is listed with ``error`` set (never skipped silently).
    Only manifests and the store's listing are read, never shard files."""
    root = open_store(uri, s3_options)
    latest = _read_latest(root)
    rows = []
    for version in list_versions(uri, s3_options):
        sizes = _sizes(root, version)
        try:
            m = _manifest_of(root, version)
        except IndexIntegrityError as exc:
            rows.append(
                VersionInfo(
                    version, None, None, None, None, None, None, sum(sizes.values()), version == latest, error=str(exc)
                )
            )
            continue
        names = [MANIFEST_NAME] + [n for n, _ in m.files()]
        rows.append(
            VersionInfo(
                version,
                m.created,
                m.num_passages,
                len(m.shards),
                m.encoder.name_or_path,
                m.encoder.pooling,
                m.encoder.dim,
                sum(sizes.get(n, 0) for n in names),
                version == latest,
            )
        )
    return sorted(rows, key=lambda r: (r.created or "", r.version))


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_versions(uri: str, rows: list[VersionInfo], *, as_json: bool = False) -> str:
    """The table ``raggen index list`` prints (``*`` marks the version LATEST names), or JSON."""
    latest = next((r.version for r in rows if r.latest), None)
    if as_json:
        return json.dumps({"uri": uri, "latest": latest, "versions": [r.to_dict() for r in rows]}, indent=2)
    if not rows:
        return f"{uri}: no published versions"
    header = ("", "VERSION", "CREATED", "PASSAGES", "SHARDS", "ENCODER", "POOLING", "DIM", "SIZE")
    table = [header]
    for r in rows:
        if r.error is not None:
            table.append(
                (
                    "*" if r.latest else "",
                    r.version,
                    "?",
                    "?",
                    "?",
                    f"unreadable: {r.error}",
                    "",
                    "",
                    human_size(r.size_bytes),
                )
            )
            continue
        table.append(
            (
                "*" if r.latest else "",
                r.version,
                r.created or "",
                str(r.num_passages),
                str(r.num_shards),
                r.encoder or "",
                r.pooling or "",
                str(r.dim),
                human_size(r.size_bytes),
            )
        )
    right = {3, 4, 7, 8}
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join((c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in table
    ]
    lines.append(f"LATEST -> {latest}" if latest else "LATEST -> (none)")
    return "\n".join(lines)


def _require_published(root: Store, version: str, s3_options: Mapping[str, Any] | None) -> None:
    check_version_name(version)
    if not root.exists(f"{version}/{MANIFEST_NAME}"):
        known = list_versions(root.uri, s3_options)
        raise ConfigError(
            f"version: {version!r} is not published under {root.uri} "
            f"(versions: {', '.join(known) if known else 'none'})"
        )


def set_latest_version(
    uri: str, version: str, *, rollback: bool = False, s3_options: Mapping[str, Any] | None = None
) -> Manifest:
    """Point LATEST at ``version`` after :func:`~raggen.index.loading.verify_version` (every file
    hashed from the store). A version that does not verify raises IndexIntegrityError; moving to a
    version older than LATEST's (by ``created``, then name) needs ``rollback`` (else ConfigError)."""
    _require_published(open_store(uri, s3_options), version, s3_options)
    return set_latest(uri, version, s3_options=s3_options, verify=True, rollback=rollback)


def remove_version(uri: str, version: str, *, s3_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete ``version``'s manifest.json, then the files it names; returns the deleted names.

    Refused (ConfigError, nothing deleted) for the version LATEST names, for a version that is not
    published (no manifest.json) and for one another writer is publishing (its claim file)."""
    root = open_store(uri, s3_options)
    _require_published(root, version, s3_options)
    if _read_latest(root) == version:
        raise ConfigError(
            f"version: {version!r} is the version LATEST names under {root.uri}; "
            "move LATEST first (raggen index set-latest), then remove it"
        )
    if root.exists(f"{version}/{CLAIM_NAME}"):
        raise ConfigError(
            f"version: {version!r} under {root.uri} is being published by another writer "
            f"({version}/{CLAIM_NAME}); not removed"
        )
    try:
        names = [n for n, _ in _manifest_of(root, version).files()]
    except IndexIntegrityError:
        names = []  # an unreadable manifest names nothing we may delete: only the manifest goes
    mrel = f"{version}/{MANIFEST_NAME}"
    body = root.read_bytes(mrel)
    root.delete_file(mrel)  # from here on it is not listed, not loadable
    if _read_latest(root) == version:  # LATEST moved to it meanwhile: put the manifest back, refuse
        root.write_bytes(mrel, body, if_none_match=True)
        raise ConfigError(f"version: {version!r} became the version LATEST names under {root.uri}; not removed")
    for name in names:
        root.delete_file(f"{version}/{name}")
    if isinstance(root, LocalStore):
        try:
            root.local_path(version).rmdir()  # only when nothing else is left in it
        except OSError:
            pass
    logger.info("removed index version %s from %s (%d files)", version, root.uri, len(names) + 1)
    return [MANIFEST_NAME, *names]
