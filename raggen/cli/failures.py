"""How a failure a user can fix becomes one line (and exit code 2) in the command and in ``jobs/``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from raggen.errors import RaggenError


def run_job(prefix: str, work: Callable[[], Any], show: Callable[[Any], str]) -> int:
    """What every ``jobs/*.py`` entry point does with its work: print ``show(result)`` and return 0;
    a failure a user can fix is one line on stderr (``<prefix>error: ...``) and exit code 2; a bug
    keeps its traceback."""
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - one line for what a user can fix, a traceback for a bug
        message = failure_message(exc)
        if message is None:
            raise
        print(f"{prefix}error: {message}", file=sys.stderr)
        return 2
    print(show(result))
    return 0


def failure_message(exc: BaseException) -> str | None:
    """One line naming the cause, or None for a bug (which keeps its traceback).

    Ray wraps what failed inside a task, an actor or a Train worker: the user's own error is dug
    out of the chain (or of the remote traceback's text) first.
    """
    from raggen.errors import find_user_error

    if isinstance(exc, RaggenError):
        return str(exc)
    inner = find_user_error(exc)
    if inner is not None:
        return str(inner)
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        BotoCoreError = ClientError = ()  # type: ignore[assignment]
    if isinstance(exc, (BotoCoreError, ClientError)):
        return f"S3: {exc}"
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename}: is a folder, expected a file"
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return f"{exc.filename or exc}: {exc.strerror or exc}"
    if isinstance(exc, (ValueError, OSError)):
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None
