"""Versioned, verified model exports: what training publishes and what Serve, eval and retrieve load.

Layout of an export root (a local folder or an ``s3://`` prefix; a training run's ``final/``)::

    final/
      .raggen-exports      marker: this folder holds exports (written by the first export)
      <step>-<id>/         one export, never rewritten:
        .raggen-export     marker, written first: an export in progress, or a complete one
        query_encoder/ generator/ ... train_state.json ...   the files exported (a checkpoint)
        export.json        written after every file: {"name", "step", "created", "files": [{"path",
                           "sha256", "size"}]} (paths relative to the export's folder)
      LATEST               the name of the newest complete export (one line); written last

Writing: every file goes through ``raggen.storage`` (atomic local writes; an S3 PUT is atomic per
object), ``export.json`` is created with a conditional write (a name is exported once) and
``LATEST`` moves with a compare-and-swap (``If-Match`` on S3, the root's lock locally), only
forward in steps. A crash before ``LATEST`` moves leaves the previous export in service.

Reading (:func:`find_export`, :func:`locate_model`, :func:`verify_export`): the pointer must name an
export whose ``export.json`` exists and whose files all match their sha256. An export root with no
pointer, a folder with the in-progress marker but no ``export.json``, a missing file or a wrong
hash is refused with a one-line :class:`raggen.errors.DataError`. A folder that is none of these
(a plain Hugging Face folder, an older raggen checkpoint) is not an export: callers load it as
before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raggen.errors import DataError
from raggen.storage import (
    ChecksumMismatch,
    PreconditionFailed,
    Store,
    check_relative_name,
    copy_to_local,
    is_s3_uri,
    join_uri,
    open_store,
    sha256_file,
    split_s3_uri,
    store_sha256,
)

log = logging.getLogger(__name__)

POINTER = "LATEST"
ROOT_MARKER = ".raggen-exports"
EXPORT_MARKER = ".raggen-export"
EXPORT_MANIFEST = "export.json"
FORMAT = "raggen-model-export"
_RESERVED = {POINTER, ROOT_MARKER, EXPORT_MARKER, EXPORT_MANIFEST}
_NAME = re.compile(r"^(\d+)-[0-9A-Za-z_.]+$")


@dataclass(frozen=True)
class ExportRef:
    """One complete-looking export (its manifest read, its files not yet hashed)."""

    root: str | None  # the export root whose pointer named it (None: the export's folder was given)
    name: str
    uri: str  # the export's own folder or prefix
    manifest: dict[str, Any]
    s3_options: Any = None

    @property
    def step(self) -> int:
        return int(self.manifest.get("step", -1))

    def files(self, under: str = "") -> dict[str, str]:
        """{path relative to the export: sha256} of the files below ``under`` (all when empty)."""
        prefix = f"{under.strip('/')}/" if under else ""
        return {f["path"]: f["sha256"] for f in self.manifest["files"] if f["path"].startswith(prefix)}

    def store(self) -> Store:
        return open_store(self.uri, self.s3_options)


# ----------------------------------------------------------------------------------------- writing


def export_name(step: int, export_id: str | None = None) -> str:
    """``<step>-<id>``: sorts by step; the random id keeps two exports of one step apart."""
    name = f"{int(step)}-{export_id or secrets.token_hex(4)}"
    if not _NAME.match(name):
        raise ValueError(f"export name {name!r}: expected <step>-<id> with id of letters, digits, '_' or '.'")
    return name


def _local_files(src: Path) -> list[str]:
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    clash = sorted(set(names) & _RESERVED)
    if clash:
        raise ValueError(f"{src}: holds {clash}, names reserved for the export's own files")
    return names


def write_export(
    src: str | os.PathLike,
    root: str,
    *,
    step: int,
    s3_options=None,
    export_id: str | None = None,
    last: Iterable[str] = (),
    extra: dict[str, Any] | None = None,
) -> ExportRef:
    """Export every file of the local folder ``src`` to ``root/<step>-<id>/`` and point LATEST at it.

    Order: the root marker (once), the export's marker, each file (``last`` names go after the
    others), ``export.json`` with each file's sha256 and size, then ``LATEST``. Returns the export.
    """
    src = Path(src)
    store = open_store(root, s3_options)
    if not store.exists(ROOT_MARKER):
        _create(store, ROOT_MARKER, {"created_by": "raggen", "what": "model exports"})
    name = export_name(step, export_id)
    names = _local_files(src)
    tail = [n for n in last if n in names]
    ordered = [n for n in names if n not in tail] + tail
    if not _create(store, f"{name}/{EXPORT_MARKER}", {"created_by": "raggen", "what": "model export", "step": step}):
        raise DataError(f"{join_uri(root, name)}: already exists; an export is written once")
    files = []
    for rel in ordered:
        path = src / rel
        digest = sha256_file(path)
        store.upload_file(path, f"{name}/{rel}")
        files.append({"path": rel, "sha256": digest, "size": path.stat().st_size})
    manifest = {
        "format": FORMAT,
        "format_version": 1,
        "name": name,
        "step": int(step),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        **(extra or {}),
    }
    store.write_bytes(f"{name}/{EXPORT_MANIFEST}", (json.dumps(manifest, indent=2) + "\n").encode(), if_none_match=True)
    move_pointer(store, name)
    log.info("model export %s: %d files, LATEST -> %s", join_uri(root, name), len(files), name)
    return ExportRef(root=str(root), name=name, uri=join_uri(root, name), manifest=manifest, s3_options=s3_options)


def _create(store: Store, rel: str, info: dict[str, Any]) -> bool:
    """Create ``rel`` (JSON) only if absent; False when it already existed."""
    body = {**info, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        store.write_bytes(rel, (json.dumps(body) + "\n").encode(), if_none_match=True)
    except PreconditionFailed:
        return False
    return True


def move_pointer(store: Store, name: str, *, attempts: int = 5) -> bool:
    """Point ``LATEST`` at ``name`` with a compare-and-swap; it never moves to a lower step (a
    concurrent or older export loses and LATEST stays). True when LATEST names ``name`` after."""
    step = _step_of(name)
    for _ in range(attempts):
        try:
            data, etag = store.read_with_etag(POINTER)
        except FileNotFoundError:
            data, etag = None, None
        current = _pointer_name(data, store.uri) if data is not None else None
        if current == name:
            return True
        if current is not None and _step_of(current) > step:
            log.warning("%s: LATEST names %s (a later step); not moving it back to %s", store.uri, current, name)
            return False
        try:
            if etag is None:
                store.write_bytes(POINTER, f"{name}\n".encode(), if_none_match=True)
            else:
                store.write_bytes(POINTER, f"{name}\n".encode(), if_match=etag)
            return True
        except PreconditionFailed:
            continue  # another export moved it meanwhile: look again
    raise DataError(f"{store.uri}/{POINTER}: changed by another writer {attempts} times in a row; not moved")


def _step_of(name: str) -> int:
    m = _NAME.match(name)
    return int(m.group(1)) if m else -1


# ----------------------------------------------------------------------------------------- reading


def _pointer_name(data: bytes, where: str) -> str:
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{where}/{POINTER}: not UTF-8 text; refusing this model export") from None
    try:
        check_relative_name(name, allow_empty=False)
    except ValueError:
        raise DataError(f"{where}/{POINTER}: names {name[:80]!r}, not an export in this folder") from None
    if "/" in name:
        raise DataError(f"{where}/{POINTER}: names {name[:80]!r}, not an export in this folder")
    return name


def _read_manifest(uri: str, name: str, s3_options, root: str | None) -> ExportRef:
    store = open_store(uri, s3_options)
    try:
        data = store.read_bytes(EXPORT_MANIFEST)
    except FileNotFoundError:
        why = f"{root}/{POINTER} names {name} but it" if root else "it"
        raise DataError(
            f"{uri}: incomplete model export ({why} has no {EXPORT_MANIFEST}: the export did not finish)"
        ) from None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{uri}/{EXPORT_MANIFEST}: unreadable ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{uri}/{EXPORT_MANIFEST}: not a raggen model export manifest")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and {"path", "sha256"} <= set(f) for f in files):
        raise DataError(f"{uri}/{EXPORT_MANIFEST}: 'files' must list {{path, sha256}} entries")
    for f in files:
        try:
            check_relative_name(f["path"], allow_empty=False)
        except ValueError:
            raise DataError(f"{uri}/{EXPORT_MANIFEST}: unsafe file name {f['path'][:80]!r}") from None
    return ExportRef(root=root, name=name, uri=uri, manifest=manifest, s3_options=s3_options)


def _may_hold_export(uri: str) -> bool:
    return is_s3_uri(uri) or os.path.isdir(os.path.expanduser(uri))


def find_export(uri: str, s3_options=None) -> ExportRef | None:
    """The export ``uri`` names: an export root (its ``LATEST``) or one export's folder. None when
    ``uri`` is neither (a plain model folder, an older checkpoint, a hub id). An incomplete export
    (a root with no pointer, an export without ``export.json``) is a DataError. Nothing is hashed."""
    uri = str(uri)
    if not _may_hold_export(uri):
        return None
    if not is_s3_uri(uri):
        uri = os.path.expanduser(uri)
    store = open_store(uri, s3_options)
    try:
        data = store.read_bytes(POINTER)
    except FileNotFoundError:
        data = None
    if data is not None:
        name = _pointer_name(data, uri)
        return _read_manifest(join_uri(uri, name), name, s3_options, root=uri)
    if store.exists(EXPORT_MANIFEST) or store.exists(EXPORT_MARKER):
        return _read_manifest(uri, os.path.basename(uri.rstrip("/")), s3_options, root=None)
    if store.exists(ROOT_MARKER):
        raise DataError(f"{uri}: incomplete model export (no {POINTER} pointer: no export has finished here)")
    return None


def _parent(uri: str) -> tuple[str, str] | None:
    """(parent, last name) of a model path or S3 prefix; None at a bucket or a bare local name."""
    uri = uri.rstrip("/")
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        parent, _, base = key.rpartition("/")
        return (f"s3://{bucket}/{parent}".rstrip("/"), base) if key else None
    path = Path(uri)
    return (str(path.parent), path.name) if path.name and str(path.parent) not in (".", uri) else None


def locate_model(uri: str, s3_options=None) -> tuple[ExportRef, str] | None:
    """(export, sub-folder) for a model inside an export: ``<root>/generator`` (through LATEST),
    ``<root>/<name>/generator``, or an export itself (sub-folder ""). None when ``uri`` is not in
    an export; a DataError when the export is incomplete or lacks the sub-folder."""
    uri = str(uri) if is_s3_uri(str(uri)) else os.path.expanduser(str(uri))
    ref = find_export(uri, s3_options)
    if ref is not None:
        return ref, ""
    split = _parent(uri)
    if split is None:
        return None
    parent, base = split
    ref = find_export(parent, s3_options)
    if ref is None:
        return None
    if not ref.files(base):
        raise DataError(f"{uri}: model export {ref.uri} has no {base}/ (it holds {sorted(held_roles(ref))})")
    return ref, base


def held_roles(ref: ExportRef) -> set[str]:
    """The top-level folders of an export that hold a model (a ``config.json``)."""
    return {
        f["path"].split("/", 1)[0]
        for f in ref.manifest["files"]
        if f["path"].count("/") == 1 and f["path"].endswith("/config.json")
    }


def model_folders(uri: str, s3_options=None) -> set[str]:
    """The model sub-folders (holding a ``config.json``) of a checkpoint: those of the export it
    names (its ``export.json``; an incomplete export is a DataError), else of a local folder."""
    ref = find_export(uri, s3_options)
    if ref is not None:
        return held_roles(ref)
    path = Path(os.path.expanduser(str(uri)))
    return {p.parent.name for p in path.glob("*/config.json")} if path.is_dir() else set()


def verify_export(ref: ExportRef, under: str = "") -> None:
    """Hash every file of ``ref`` (below ``under``) in its store; a missing file or a sha256 that
    differs from ``export.json`` is a DataError naming the file."""
    store = ref.store()
    files = ref.files(under)
    if not files:
        raise DataError(f"{ref.uri}: model export lists no files{f' under {under}/' if under else ''}")
    for rel, expected in files.items():
        try:
            got = store_sha256(store, rel)
        except FileNotFoundError:
            raise DataError(f"{ref.uri}: incomplete model export ({rel} is missing)") from None
        if got != expected:
            raise DataError(
                f"{ref.uri}: model export file {rel} does not match its sha256 (corrupt or changed); refused"
            )


def download_export(ref: ExportRef, under: str, local_dir: str | os.PathLike) -> list[Path]:
    """Copy the files of ``ref`` below ``under`` into ``local_dir`` (names relative to ``under``),
    each checked against its sha256 as it streams; a mismatch or a missing file is a DataError."""
    store = ref.store()
    out = []
    prefix = f"{under}/" if under else ""
    for rel, expected in ref.files(under).items():
        dst = Path(local_dir, *rel[len(prefix) :].split("/"))
        try:
            copy_to_local(store, rel, dst, expected_sha256=expected)
        except FileNotFoundError:
            raise DataError(f"{ref.uri}: incomplete model export ({rel} is missing)") from None
        except ChecksumMismatch:
            raise DataError(
                f"{ref.uri}: model export file {rel} does not match its sha256 (corrupt or changed); refused"
            ) from None
        out.append(dst)
    return out


def resolve_export(uri: str, s3_options=None, *, verify: bool = True) -> str:
    """The folder to read for ``uri``: the export it names (verified unless ``verify=False``), or
    ``uri`` itself when it is no export (older layouts load as before)."""
    ref = find_export(uri, s3_options)
    if ref is None:
        return uri
    if verify:
        verify_export(ref)
    return ref.uri
