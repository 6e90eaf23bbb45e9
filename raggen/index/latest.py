"""The LATEST pointer of a published root: reading it, listing versions, moving it forward only
(a compare-and-swap on the store's etag; back only as an explicit rollback).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index.manifest import _SAFE_NAME, LATEST_NAME, MANIFEST_NAME, Manifest, _read_manifest_at
from raggen.storage import PreconditionFailed, Store, join_uri, open_store

logger = logging.getLogger(__name__)


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
