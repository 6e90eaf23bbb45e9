"""Folders raggen owns: a marker file claims a folder; only a claimed folder is ever deleted."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import time

from raggen.errors import ConfigError
from raggen.storage.common import LOCK_NAME, PreconditionFailed
from raggen.storage.names import join_uri
from raggen.storage.stores import LocalStore, open_store

logger = logging.getLogger(__name__)


def check_claimable(uri: str | os.PathLike, marker: str, *, what: str, s3_options=None) -> dict | None:
    """The marker of a folder raggen owns, None for a folder it may claim (absent or empty);
    anything else is a ConfigError naming ``what`` (nothing is touched)."""
    uri = str(uri)
    store = open_store(uri, s3_options)
    if isinstance(store, LocalStore) and store.root.exists() and not store.root.is_dir():
        raise ConfigError(f"{what}: {uri} is a file, expected a folder")
    try:
        return json.loads(store.read_bytes(marker))
    except FileNotFoundError:
        pass
    except ValueError:
        raise ConfigError(
            f"{what}: {join_uri(uri, marker)} is not a raggen marker file; refusing to use {uri}"
        ) from None
    if isinstance(store, LocalStore):  # (a lock file alone is what a claim racing this one leaves)
        entries = [e for e in store.root.iterdir() if e.name != LOCK_NAME] if store.root.is_dir() else []
    else:
        entries = store.list()
    if entries:
        raise ConfigError(
            f"{what}: {uri} is not empty and was not created by raggen (no {marker} marker); refusing to use "
            "or delete it. Give a new or empty folder"
        )
    return None


def claim_folder(uri: str | os.PathLike, marker: str, *, what: str, s3_options=None) -> dict:
    """Make ``uri`` (a local folder or an S3 prefix) a folder raggen owns, and return its marker.

    - absent: created, with ``marker`` written in it (``created_dir: true``);
    - empty: ``marker`` written in it (``created_dir: false``: the folder itself stays);
    - holding ``marker``: raggen made it before; its marker is returned;
    - anything else: ConfigError naming ``what``; nothing is touched.
    The marker holds a random ``id`` that stays with the folder.
    """
    uri = str(uri)
    store = open_store(uri, s3_options)
    created = isinstance(store, LocalStore) and not store.root.exists()
    info = check_claimable(uri, marker, what=what, s3_options=s3_options)
    if info is not None:
        return info
    info = {"created_by": "raggen", "what": what, "created_dir": created, "id": secrets.token_hex(6),
            "pid": os.getpid(), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    if isinstance(store, LocalStore):
        store.root.mkdir(parents=True, exist_ok=True)
    try:
        store.write_bytes(marker, (json.dumps(info) + "\n").encode(), if_none_match=True)
    except PreconditionFailed:  # another run claimed it at the same moment: it is raggen's, take its marker
        return json.loads(store.read_bytes(marker))
    return info


def owns_folder(uri: str | os.PathLike, marker: str, s3_options=None) -> bool:
    try:
        return open_store(str(uri), s3_options).exists(marker)
    except ValueError:
        return False


def release_folder(uri: str | os.PathLike, marker: str, *, s3_options=None) -> bool:
    """Delete a folder raggen owns (``marker`` inside): the whole folder when raggen created it,
    else what is in it. A folder without the marker is left alone (returns False)."""
    uri = str(uri)
    store = open_store(uri, s3_options)
    try:
        info = json.loads(store.read_bytes(marker))
    except (FileNotFoundError, ValueError):
        logger.warning("%s: no %s marker; not deleting a folder raggen did not create", uri, marker)
        return False
    if isinstance(store, LocalStore):
        if info.get("created_dir", False):
            shutil.rmtree(store.root, ignore_errors=True)
        else:
            for entry in store.root.iterdir():
                if entry.name == marker:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            store.delete_file(marker)
    else:
        keys = [store._key(n) for n in store.list() if n != marker]
        for i in range(0, len(keys), 1000):  # the marker goes last: a half-removed folder stays raggen's
            store.client.delete_objects(Bucket=store.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]],
                                                                     "Quiet": True})  # fmt: skip
        store.delete_file(marker)
    return True
