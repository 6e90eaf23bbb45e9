import logging

from raggen.errors import ConfigError, DataError, IndexIntegrityError, RaggenError

# faiss logs its failed AVX512/AVX2 library probes ("ModuleNotFoundError ...") at INFO, which Ray's
# workers print: every Train worker and replica looked as if it had failed to import something
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "IndexIntegrityError", "RaggenError"]
