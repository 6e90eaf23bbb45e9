"""Errors that users see: one line, naming the file and row or the config field."""


class RaggenError(Exception):
    """Base class: the CLI prints these as one line and exits 2, never with a traceback."""


class ConfigError(RaggenError):
    """An invalid config value; the message names the field (e.g. ``train.lr``)."""


class DataError(RaggenError):
    """A bad data file; the message names the file and the row or column."""


class IndexIntegrityError(RaggenError):
    """A published index that is partial or corrupt (missing file, wrong sha256, bad manifest)."""
