"""An index build's work dir: claimed with a marker, locked while a run uses it, keyed by the run's signature so a rerun resumes only its own work."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raggen.corpus.readers import canonical_format
from raggen.errors import ConfigError
from raggen.index.manifest import shard_file_names
from raggen.storage import (
    FileLock,
    StoreBusy,
    atomic_write_bytes,
    claim_folder,
    content_fingerprint,
    is_s3_uri,
    join_uri,
    release_folder,
    sha256_file,
)

logger = logging.getLogger(__name__)

WORK_MARKER = ".raggen-work"  # in every work dir raggen made (or adopted empty): it may delete those
WORK_LOCK = ".raggen-work.lock"  # held while a run uses the work dir


# ------------------------------------------------------------------------------------------ work dir


@dataclass
class EncodedShard:
    shard: int
    path: Path  # encoded/shard-K.parquet (row_id, id, title, text, embedding)
    count: int


@dataclass
class EncodedCorpus:
    shards: list[EncodedShard]
    dim: int

    @property
    def num_passages(self) -> int:
        return sum(s.count for s in self.shards)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _model_fingerprint(name_or_path: str, s3_options) -> list:
    """The encoder's files (a local or s3:// folder, the bundled copy of a hub id), else [] (a hub id)."""
    from raggen.models.loading import resolve_model_path

    if is_s3_uri(name_or_path):
        return content_fingerprint(name_or_path, s3_options)
    local = resolve_model_path(name_or_path)
    return content_fingerprint(local) if os.path.isdir(local) else []


def run_signature(
    passages_uri: str,
    *,
    encoder_name_or_path: str,
    passages_format: str = "auto",
    num_shards: int = 1,
    pooling: str = "mean",
    max_length: int = 256,
    normalize: bool = False,
    passage_format: str | None = None,
    passage_prefix: str = "",
    s3_options: Mapping[str, Any] | None = None,
) -> dict:
    """What an encoding run's output depends on: the corpus content (every input file: size +
    mtime locally, ETag + size on S3), the encoder (and its files) and every setting that changes
    the vectors or the split. A work dir is reused only for an equal signature."""
    return dict(
        passages_uri=str(passages_uri), corpus=content_fingerprint(str(passages_uri), s3_options),
        format=canonical_format(passages_format), num_shards=int(num_shards), encoder=encoder_name_or_path,
        encoder_files=_model_fingerprint(encoder_name_or_path, s3_options), pooling=pooling,
        max_length=int(max_length), normalize=bool(normalize), passage_format=passage_format,
        **({"passage_prefix": passage_prefix} if passage_prefix else {}),  # absent when none: older work dirs still match
    )  # fmt: skip


def check_run_signature(work_dir: Path, signature: dict) -> None:
    """A work dir belongs to one run: reusing it with different settings or a changed corpus is a
    ConfigError (its encodings would be stale)."""
    path = work_dir / "run.json"
    old = _read_json(path)
    if old is None:
        _write_json(path, signature)
        return
    for key, value in signature.items():
        if old.get(key) == value:
            continue
        if key in ("corpus", "encoder_files"):
            what = "corpus" if key == "corpus" else f"encoder {signature['encoder']!r}"
            raise ConfigError(
                f"work_dir: {work_dir} holds work for another version of the {what} (files, sizes or "
                "modification times differ); use a fresh work_dir, or delete this one"
            )
        raise ConfigError(
            f"work_dir: {work_dir} was used for a run with {key}={old.get(key)!r}, this run has {value!r}; "
            "use a fresh work_dir"
        )


def lock_work_dir(work_dir: str | os.PathLike, *, what: str = "work_dir") -> tuple[dict, FileLock]:
    """Claim ``work_dir`` for raggen (marker ``.raggen-work``; a non-empty folder without it is a
    ConfigError and is never touched) and lock it for this run (StoreBusy when another run holds
    it). Reentrant within a thread. Returns (marker, lock); release the lock when done."""
    work_dir = Path(work_dir)
    info = claim_folder(work_dir, WORK_MARKER, what=what)
    lock = FileLock(work_dir / WORK_LOCK, timeout=0, what=f"{what} {work_dir} (in use by another run)")
    lock.acquire()
    return info, lock


def remove_work_dir(work_dir: str | os.PathLike) -> bool:
    """Delete a work dir raggen made (its marker inside); anything else is left alone."""
    return release_folder(work_dir, WORK_MARKER)


def default_work_dir(**signature: Any) -> Path:
    """A stable work dir per (inputs and their content, settings), so rerunning the same build
    resumes it, and a changed corpus gets a new one."""
    key = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "raggen-index-work" / key


def open_work_dir(work_dir: str | os.PathLike | None, signature: dict):
    """(work dir, its marker, its lock) for one build: ``work_dir`` as given (claimed: refused if
    not empty and not raggen's; locked: refused if another run uses it), or the default derived
    from ``signature``; when another build holds that one, a fresh one of this run's own."""
    if work_dir is not None:
        path = Path(os.path.expanduser(str(work_dir)))
        return (path, *lock_work_dir(path))
    path = default_work_dir(**signature)
    try:
        return (path, *lock_work_dir(path))
    except StoreBusy:
        fresh = path.with_name(f"{path.name}-{os.getpid()}-{secrets.token_hex(3)}")
        logger.info("work dir %s is in use by another build; this one works in %s", path, fresh)
        return (fresh, *lock_work_dir(fresh))


def encoded_shard_done(work_dir: Path, shard: int) -> EncodedShard | None:
    """The finished shard, if its done marker exists and the file's sha256 matches it."""
    name = shard_file_names(shard)[1]
    path, marker = work_dir / "encoded" / name, _read_json(work_dir / "encoded" / f"{name}.done.json")
    if marker is None or not path.is_file():
        return None
    if sha256_file(path) != marker.get("sha256"):
        logger.warning("encoded shard %s does not match its done marker; re-encoding it", path)
        return None
    return EncodedShard(shard=shard, path=path, count=int(marker["count"]))


def _encoder_config(name_or_path: str, s3_options=None) -> dict:
    """The encoder's config.json as a dict (an ``s3://`` folder's is read there)."""
    from transformers import AutoConfig

    from raggen.models.loading import resolve_model_path
    from raggen.storage import is_s3_uri, read_bytes

    if is_s3_uri(name_or_path):
        return json.loads(read_bytes(join_uri(name_or_path, "config.json"), s3_options))
    return AutoConfig.from_pretrained(resolve_model_path(name_or_path)).to_dict()


def encoder_dim(name_or_path: str, s3_options=None) -> int:
    """The width of the encoder's vectors: a DPR encoder's projection when it has one, else its hidden size."""
    config = _encoder_config(name_or_path, s3_options)
    projection = int(config.get("projection_dim") or 0) if config.get("model_type") == "dpr" else 0
    return projection or int(config["hidden_size"])


def resolved_passage_format(name_or_path: str, passage_format: str | None, s3_options=None) -> str:
    """``passage_format`` as given, or the model's own (``pair`` for DPR, else ``joined``), for the manifest."""
    if passage_format is not None:
        return passage_format
    return "pair" if _encoder_config(name_or_path, s3_options).get("model_type") == "dpr" else "joined"
