"""Publishing a version: the claim on its name, the upload, the manifest as the commit point, then
LATEST moved forward; setting LATEST to a verified version; copying a version to another root.

The rules (conditional writes, claims, forward-only LATEST) are the contract described in
:mod:`raggen.index.manifest`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raggen.errors import ConfigError, IndexIntegrityError
from raggen.index.latest import _read_latest, advance_latest, read_latest
from raggen.index.loading import read_manifest, resolve_version_uri, verify_version
from raggen.index.manifest import (
    CLAIM_NAME,
    CLAIM_TTL_S,
    MANIFEST_NAME,
    Manifest,
    _read_manifest_at,
    check_version_name,
)
from raggen.storage import (
    PreconditionFailed,
    S3Options,
    Store,
    atomic_write_bytes,
    join_uri,
    open_store,
    sha256_bytes,
    store_sha256,
)

logger = logging.getLogger(__name__)


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


def publish_index(
    src_uri: str,
    dst_uri: str,
    *,
    version: str | None = None,
    src_version: str | None = None,
    s3_options: Mapping[str, Any] | None = None,
    src_s3_options: Mapping[str, Any] | None = None,
    rollback: bool = False,
    move_latest: bool = True,
) -> Manifest:
    """Copy a published version (``src_uri``: a root with LATEST, or a version folder) to another
    root, e.g. a locally built index to S3. The manifest's files are streamed into a temporary
    folder, verified there, uploaded and verified again in the destination; ``version`` renames
    it there. LATEST at the destination moves forward only, unless ``rollback``."""
    src_opts = src_s3_options if src_s3_options is not None else s3_options
    version_uri = resolve_version_uri(src_uri, src_version, s3_options=src_opts)
    source = read_manifest(version_uri, s3_options=src_opts)
    src = open_store(version_uri, src_opts)
    with tempfile.TemporaryDirectory(prefix="raggen-publish-") as tmp:
        for name, _ in source.files():
            src.download_file(name, Path(tmp, name))
        atomic_write_bytes(Path(tmp, "manifest.json"), source.to_json().encode())
        manifest = verify_version(tmp)  # the local copy, every checksum and count
        if version is not None:
            manifest = manifest.model_copy(update={"version": version})
        return publish_version(
            dst_uri, manifest, tmp, s3_options=s3_options, rollback=rollback, move_latest=move_latest
        )
