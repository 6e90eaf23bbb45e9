from raggen.errors import ConfigError, DataError, IndexIntegrityError, RaggenError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "IndexIntegrityError", "RaggenError"]
