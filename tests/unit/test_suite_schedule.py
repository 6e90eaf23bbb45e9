"""The suite's file schedule (tests/conftest.py) names files that exist, so a renamed slow file
cannot silently drop to the end of ``make test``'s queue."""

from __future__ import annotations

from tests.conftest import SLOWEST_FILES_FIRST
from tests.helpers import REPO


def test_every_scheduled_file_exists_once():
    assert len(set(SLOWEST_FILES_FIRST)) == len(SLOWEST_FILES_FIRST)
    missing = [path for path in SLOWEST_FILES_FIRST if not (REPO / path).is_file()]
    assert not missing, missing
