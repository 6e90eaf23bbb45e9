"""A training checkpoint as one folder: HF ``save_pretrained`` model folders + optimizer + JSA cache.

Layout (the folder handed to ``ray.train.Checkpoint.from_directory``, also what ``raggen eval``
and Serve load)::

    query_encoder/  posterior_encoder/  passage_encoder/  generator/  reranker/
                        HF folders (the ones trained)
    optimizer.pt        torch optimizer state_dict (param groups in the loop's fixed order)
    jsa_cache.pt        JSAChainCache.state_dict() merged over all workers (JSA only)
    config.yaml         the resolved RaggenConfig of the run that wrote it (what produced these weights)
    train_state.json    {"step", "epoch", "estimator", "models": [...], "index": {...}, ...}; written
                        last ("index": the refreshed index version the run searches, if any)

``train_state.json`` is written last, so a folder without it is incomplete and refused.

The run's final export (:func:`export_checkpoint`) is a versioned model export of such a folder,
``final/<step>-<id>/`` + ``export.json`` (each file's sha256) + ``final/LATEST`` written last
(:mod:`raggen.models.exports`); :func:`read_checkpoint` reads an export only once verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raggen.errors import DataError
from raggen.storage import AtomicFile, atomic_write_bytes

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
JSA_CACHE_FILE = "jsa_cache.pt"
CONFIG_FILE = "config.yaml"
MODEL_NAMES = ("query_encoder", "posterior_encoder", "passage_encoder", "generator", "reranker")


@dataclass
class TrainingState:
    """What a checkpoint restores: the step to continue after and where each model folder lies."""

    step: int
    epoch: int = 0
    model_dirs: dict[str, str] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    jsa_cache_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def write_checkpoint(
    directory: str | os.PathLike,
    *,
    models: Mapping[str, Any],
    step: int,
    epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    jsa_cache_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    config_yaml: str | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` (created; must be empty or absent).

    ``models`` maps names from MODEL_NAMES to objects with ``save_pretrained(dir)``; unwrap DDP
    before passing them; ``config_yaml`` (the run's resolved config) is saved as ``config.yaml``.
    The state file goes last, so readers can trust a folder that has it.
    """
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"models: unknown names {unknown}; expected some of {MODEL_NAMES}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if (out / STATE_FILE).exists():
        raise ValueError(f"{out}: already holds a checkpoint; write each one to a fresh folder")
    for name, model in models.items():
        model.save_pretrained(str(out / name))
    if optimizer is not None:
        _torch_save_atomic(optimizer.state_dict(), out / OPTIMIZER_FILE)
    if jsa_cache_state is not None:
        _torch_save_atomic(jsa_cache_state, out / JSA_CACHE_FILE)
    if config_yaml is not None:
        _write_text_atomic(out / CONFIG_FILE, config_yaml)
    state = {"step": int(step), "epoch": int(epoch), "models": sorted(models), **(extra or {})}
    _write_text_atomic(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True, default=str))
    return out


def read_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> TrainingState:
    """Read what ``write_checkpoint`` wrote; a folder without the state file is refused. A model
    export (``final/``, through its LATEST, or one ``final/<step>-<id>/``) is read only once every
    file matches its sha256; an incomplete or tampered one is a DataError."""
    from raggen.models.exports import resolve_export

    src = Path(resolve_export(str(directory)))
    state = _read_state(src)
    names = list(state.pop("models", []))
    model_dirs = {}
    for name in names:
        if not (src / name).is_dir():
            raise DataError(f"{src}: checkpoint lists model {name!r} but has no {name}/ folder")
        model_dirs[name] = str(src / name)
    optimizer_state = _torch_load(src / OPTIMIZER_FILE, map_location)
    jsa_cache_state = _torch_load(src / JSA_CACHE_FILE, map_location)
    step = int(state.pop("step"))
    epoch = int(state.pop("epoch", 0))
    return TrainingState(step, epoch, model_dirs, optimizer_state, jsa_cache_state, extra=state)


def _torch_load(path: Path, map_location) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it instead of a pickle traceback
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _read_state(src: Path) -> dict[str, Any]:
    state_path = src / STATE_FILE
    if not state_path.exists():
        raise DataError(f"{src}: not a complete raggen checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{state_path}: invalid JSON ({getattr(e, 'msg', None) or type(e).__name__})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise DataError(f"{state_path}: missing field 'step'")
    return state


def _torch_save_atomic(obj: Any, path: Path) -> None:
    with AtomicFile(path, "wb", compress=False) as f:
        torch.save(obj, f)


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def export_checkpoint(src: str | os.PathLike, root: str, s3_options=None) -> str:
    """Export a complete checkpoint folder as a new model export under ``root`` (a run's ``final/``,
    folder or s3://): ``root/<step>-<id>/`` with ``export.json``, then ``root/LATEST``. The state
    file is uploaded after the other files. Returns the export's URI."""
    from raggen.models.exports import write_export

    state = _read_state(Path(src))  # refuse to publish an incomplete folder
    ref = write_export(
        src,
        root,
        step=int(state["step"]),
        s3_options=s3_options,
        last=[STATE_FILE],
        extra={"models": sorted(state.get("models") or [])},
    )
    return ref.uri


def restore_state() -> tuple[TrainingState | None, contextlib.ExitStack]:
    """The latest checkpoint Ray hands back (resume after a failure or a rerun of the same name).

    The checkpoint folder stays available until the returned stack closes (after models load).
    """
    import ray.train

    stack = contextlib.ExitStack()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, stack
    directory = stack.enter_context(_checkpoint_directory(checkpoint))
    return read_checkpoint(directory), stack


@contextlib.contextmanager
def _checkpoint_directory(checkpoint) -> Iterator[str]:
    """A local folder holding the checkpoint. A remote (S3) one is downloaded into this worker's own
    temporary folder: ``Checkpoint.as_directory()`` shares one folder among a node's workers, and a
    worker that takes the download lock after another finished downloads again over the files the
    first is reading (seen as a corrupt optimizer.pt on resume)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    tmp = tempfile.mkdtemp(prefix="raggen-restore-")
    try:
        yield checkpoint.to_directory(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
