"""Errors that users see: one line, naming the file and row or the config field."""

import re


class RaggenError(Exception):
    """Base class: the CLI prints these as one line and exits 2, never with a traceback."""


class ConfigError(RaggenError):
    """An invalid config value; the message names the field (e.g. ``train.lr``)."""


class DataError(RaggenError):
    """A bad data file; the message names the file and the row or column."""


class IndexIntegrityError(RaggenError):
    """A published index that is partial or corrupt (missing file, wrong sha256, bad manifest)."""


def find_user_error(exc: BaseException) -> RaggenError | None:
    """The first plain raggen error in ``exc``'s cause chain (Ray wraps task errors)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaggenError) and type(e).__module__ == "raggen.errors":
            # one line, as raggen's errors are (Ray's retry wrappers append their own lines)
            return type(e)((str(e.args[0]) if e.args else str(e)).splitlines()[0])
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    # Ray may ship only the remote traceback's text: recover "raggen.errors.DataError: <message>"
    for line in reversed(str(exc).splitlines()):
        match = re.match(r"^\s*raggen\.errors\.(\w+): (.*)$", line)
        found = globals().get(match.group(1)) if match else None
        if isinstance(found, type) and issubclass(found, RaggenError):
            return found(match.group(2))
    return None
