"""What several test modules share and that is not a fixture: paths and small builders."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
