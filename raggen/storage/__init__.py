"""One interface over local folders and ``s3://bucket/prefix``: read, write, list, copy, sha256,
atomic local writes, locks, conditional writes and folders that raggen owns.

Why one interface: an index is published to a folder on a laptop and to S3 on a cluster, and the
publish/verify logic (raggen.index.manifest) must be the same code for both.

Atomicity: every local file raggen writes goes through :class:`AtomicFile` (a temporary name in
the same folder, fsync, ``os.replace``, fsync of the folder; the temporary file is removed on
failure) and gets the mode the user's umask gives (0644 under umask 022), never mkstemp's 0600.
A folder is replaced as a whole with :func:`atomic_directory`. An S3 PUT (single or multipart)
becomes visible all at once when it completes, so readers never see half an object.

Concurrency: ``write_bytes(..., if_none_match=True)`` creates a name only if it does not exist
and ``write_bytes(..., if_match=etag)`` replaces it only if nobody changed it since it was read.
S3 does this itself (``IfNoneMatch="*"`` / ``IfMatch`` on PutObject); a local folder does it under
a per-root lock file (:class:`FileLock`: ``flock``, the holder's pid and host inside; the kernel
drops the lock when its holder dies, so a killed process never leaves a stale lock).

Deletion: raggen deletes only folders it created. :func:`claim_folder` writes a marker file into
a folder it creates (or into an empty one it is given); :func:`release_folder` removes a folder
only when the marker is there; a non-empty folder without the marker is refused, never deleted.

The S3 client is plain boto3: endpoint, region, credentials and retries come from explicit keyword
arguments or the standard AWS environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_MAX_ATTEMPTS``).
"""

from __future__ import annotations

from raggen.storage.atomic import (  # noqa: F401
    AtomicFile,
    atomic_copy_file,
    atomic_directory,
    atomic_write_bytes,
    atomic_writer,
    fsync_dir,
)
from raggen.storage.common import CHUNK, LOCK_NAME, ChecksumMismatch, PreconditionFailed, StoreBusy  # noqa: F401
from raggen.storage.folders import check_claimable, claim_folder, owns_folder, release_folder  # noqa: F401
from raggen.storage.hashing import (  # noqa: F401
    HashingWriter,
    iter_file_chunks,
    sha256_bytes,
    sha256_chunks,
    sha256_file,
)
from raggen.storage.locks import FileLock  # noqa: F401
from raggen.storage.names import check_relative_name, is_s3_uri, join_uri, split_s3_uri  # noqa: F401
from raggen.storage.s3 import S3Options, pyarrow_s3_filesystem, s3_client  # noqa: F401
from raggen.storage.stores import LocalStore, S3Store, Store, copy_to_local, open_store, store_sha256  # noqa: F401
from raggen.storage.uris import (  # noqa: F401
    content_fingerprint,
    default_cache_dir,
    download,
    exists,
    list_uri,
    read_bytes,
    upload_dir,
    write_bytes,
)
