"""Files derived from a version's verified passage parquet into the local cache (texts as compressed
blocks, stored vectors as a ``.npy``, both read with ``pread``), made once per node and
shared through the page cache by every process that serves the shard.

Each file is made in a short-lived child process: decoding the parquet costs the decoder's buffers
(measured: ~100 MB kept by a process after streaming a 250k-passage text column, even on the
system allocator with ``malloc_trim``), which a shard actor that serves for days should not carry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from raggen.errors import IndexIntegrityError, RaggenError
from raggen.index.passage_blocks import PassageBlocks, write_passage_blocks
from raggen.index.passage_vectors import PassageVectors, open_passage_vectors, write_passage_vectors
from raggen.index.version_cache import cache_mark_used

_WRITERS = {"blocks": write_passage_blocks, "vectors": write_passage_vectors}


def derived_dir(vuri: str, cache: Path | None, cache_root: Path) -> Path:
    """The S3 version's cache folder, or for a local version a folder under ``cache_root / "local"``
    named after its path (never the user's folder), marked used like a cached version."""
    if cache is not None:
        return cache
    local = cache_root / "local" / os.path.abspath(vuri).lstrip(os.sep)
    local.mkdir(parents=True, exist_ok=True)
    cache_mark_used(local)
    return local


def _derive(kind: str, parquet_path: Path, out_path: Path, source_sha256: str) -> None:
    """Run the ``kind`` writer in a child Python (see the module docstring)."""
    import raggen

    env = dict(os.environ)
    package_root = str(Path(raggen.__file__).resolve().parents[1])  # importable in the child too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "raggen.index.passage_cache", kind, str(parquet_path), str(out_path), source_sha256]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:  # e.g. a full or read-only cache disk: the child's last line says which
        last = (run.stderr.strip().splitlines() or ["no message"])[-1]
        raise RaggenError(f"{parquet_path}: could not make {out_path.name} in {out_path.parent} ({last})")


def _open_derived(kind: str, suffix: str, opener, parquet_path: Path, source_sha256: str, rows: int, folder: Path):
    """``opener`` on the ``kind`` file of a verified parquet in ``folder``, made there first (in a
    child process) when it is missing or does not verify (stale or damaged: replaced atomically)."""
    path = folder / f"{parquet_path.name}.{source_sha256[:16]}{suffix}"
    if path.exists():
        try:
            return opener(path, source_sha256=source_sha256, rows=rows)
        except IndexIntegrityError:
            pass
    _derive(kind, parquet_path, path, source_sha256)
    return opener(path, source_sha256=source_sha256, rows=rows)


def open_blocks(parquet_path: Path, source_sha256: str, rows: int, folder: Path) -> PassageBlocks:
    """The texts of a verified parquet as blocks in ``folder``."""
    return _open_derived("blocks", ".blocks", PassageBlocks, parquet_path, source_sha256, rows, folder)


def open_vectors(parquet_path: Path, source_sha256: str, rows: int, folder: Path) -> PassageVectors:
    """The stored embeddings of a verified parquet, read on demand from ``folder``."""
    return _open_derived("vectors", ".vectors.npy", open_passage_vectors, parquet_path, source_sha256, rows, folder)


def main(argv: list[str]) -> None:
    kind, parquet_path, out_path, source_sha256 = argv
    _WRITERS[kind](parquet_path, out_path, source_sha256=source_sha256)


if __name__ == "__main__":
    main(sys.argv[1:])
