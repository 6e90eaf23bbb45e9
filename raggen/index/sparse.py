"""The optional BM25 sparse index of a version (``bm25s``), stored beside the dense shards.

Its files are files of the version like the shards: flat names (``bm25-*.npy``, ``bm25-*.json``,
and ``bm25-row-ids.npy``, the FAISS row id and shard number of each BM25 document), listed with their sha256 in the
manifest's ``sparse`` entry, uploaded and verified by ``publish_version``, hashed by
``verify_version`` and removed by ``raggen index rm``. A reader (:func:`load_sparse`) verifies
every one before it searches.

Documents are ``title + " " + text``; tokens are lower-cased ``\\w\\w+`` words without English
stop words (:func:`tokenize`, the one definition for passages and queries). No Ray here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raggen.errors import IndexIntegrityError

logger = logging.getLogger(__name__)

SPARSE_KINDS = ("bm25",)
ROW_IDS_NAME = "bm25-row-ids.npy"
# bm25s.BM25.save/load keyword -> the file's name in the version
BM25_NAMES = {
    "data_name": "bm25-data.csc.npy",
    "indices_name": "bm25-indices.csc.npy",
    "indptr_name": "bm25-indptr.csc.npy",
    "vocab_name": "bm25-vocab.json",
    "params_name": "bm25-params.json",
    "nnoc_name": "bm25-nonoccurrence.npy",  # written only by BM25 variants that need it
}
STOPWORDS = "en"


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stop words (passages and queries alike)."""
    import bm25s

    return bm25s.tokenize(list(texts), lower=True, stopwords=STOPWORDS, return_ids=False, show_progress=False)


def document_texts(titles: list[str], texts: list[str]) -> list[str]:
    return [f"{t} {x}" if t else x for t, x in zip(titles, texts)]


def build_bm25_files(
    titles: list[str],
    texts: list[str],
    row_ids: np.ndarray,
    shards: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    k1: float = 1.5,
    b: float = 0.75,
) -> tuple[list[Path], dict[str, Any]]:
    """Build BM25 over the passages (``row_ids`` / ``shards``: where each one is in the dense
    shards) and write its files into ``out_dir``: (paths, params)."""
    import bm25s

    from raggen.storage import atomic_write_bytes

    out_dir = Path(out_dir)
    row_ids = np.ascontiguousarray(row_ids, dtype=np.int64)
    shards = np.ascontiguousarray(shards, dtype=np.int64)
    assert row_ids.ndim == 1 and len(row_ids) == len(texts) == len(titles) == len(shards), "one row id per passage"
    model = bm25s.BM25(k1=k1, b=b)
    model.index(tokenize(document_texts(titles, texts)), show_progress=False)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".bm25-build-") as tmp:  # then renamed in
        model.save(str(tmp), show_progress=False, **BM25_NAMES)
        written = sorted(p.name for p in Path(tmp).iterdir())
        for name in written:
            os.replace(Path(tmp, name), out_dir / name)
    buf = _npy_bytes(np.stack([row_ids, shards], axis=1))  # (n, 2): row id, shard
    atomic_write_bytes(out_dir / ROW_IDS_NAME, buf)
    params = {"k1": k1, "b": b, "method": "lucene", "stopwords": STOPWORDS, "count": len(row_ids)}
    return [out_dir / n for n in [*written, ROW_IDS_NAME]], params


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@dataclass
class SparseIndex:
    """A loaded BM25 index: ``search(questions, k)`` -> (scores (b, k), row ids (b, k), -1 = none)."""

    model: Any  # bm25s.BM25
    row_ids: np.ndarray  # (n,) int64: the FAISS row id of each BM25 document
    shards: np.ndarray  # (n,) int64: its shard number

    def __post_init__(self) -> None:
        self._order = np.argsort(self.row_ids, kind="stable")
        self._sorted = self.row_ids[self._order]

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, source: str | None = None) -> SparseIndex:
        import bm25s

        folder = Path(folder)
        names = {k: v for k, v in BM25_NAMES.items() if k != "nnoc_name" or (folder / v).exists()}
        try:
            model = bm25s.BM25.load(str(folder), mmap=True, show_progress=False, **names)
            where = np.load(folder / ROW_IDS_NAME, allow_pickle=False)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise IndexIntegrityError(f"{source or folder}: BM25 index does not load ({exc})") from None
        n = int(model.scores["num_docs"])
        if where.shape != (n, 2):
            raise IndexIntegrityError(f"{source or folder}: {ROW_IDS_NAME} has shape {where.shape}, expected ({n}, 2)")
        return cls(model=model, row_ids=where[:, 0].astype(np.int64), shards=where[:, 1].astype(np.int64))

    def shard_of(self, row_ids: np.ndarray) -> np.ndarray:
        """The shard number of each row id (any shape; -1 stays -1). Every passage has a BM25
        document, so this maps dense hits too."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, row_ids), len(self._sorted) - 1)
        found = (row_ids >= 0) & (self._sorted[pos] == row_ids)
        if not found[row_ids >= 0].all():
            raise KeyError("row id not in the BM25 index")
        return np.where(found, self.shards[self._order[pos]], -1)

    @property
    def num_docs(self) -> int:
        return len(self.row_ids)

    def search(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k BM25 per question, best first; documents sharing no token with it are no hit."""
        b, kk = len(questions), min(int(k), self.num_docs)
        scores = np.full((b, k), -np.inf, np.float32)
        rows = np.full((b, k), -1, np.int64)
        if b == 0 or kk == 0:
            return scores, rows
        docs, got = self.model.retrieve(tokenize(questions), k=kk, show_progress=False, n_threads=1)  # (b, kk)
        got = np.asarray(got, np.float32)
        hit = got > 0
        scores[:, :kk] = np.where(hit, got, -np.inf)
        rows[:, :kk] = np.where(hit, self.row_ids[np.asarray(docs, np.int64)], -1)
        return scores, rows


def load_sparse(
    uri: str, version: str | None = None, *, s3_options=None, cache_dir=None, from_store: bool = False
) -> SparseIndex | None:
    """The version's BM25 index (None when it has none), every file's sha256 checked first (an S3
    version's files through the local cache, as ``load_version`` does). ``uri``: a root (then
    ``version``, LATEST when None) or a version folder (then ``version``, if given, must match)."""
    from raggen.index.loading import _fetch_verified, _version_store
    from raggen.index.manifest import MANIFEST_NAME, _read_manifest_at
    from raggen.storage import default_cache_dir, is_s3_uri, open_store

    in_version = version is not None and open_store(uri, s3_options).exists(MANIFEST_NAME)
    store, vuri, expected = _version_store(uri, None if in_version else version, s3_options)
    manifest = _read_manifest_at(store, vuri, version if in_version else expected)
    if manifest.sparse is None:
        return None
    cache = None
    if is_s3_uri(vuri):
        cache = Path(cache_dir or default_cache_dir()) / vuri[len("s3://") :]
        cache.mkdir(parents=True, exist_ok=True)
    paths = [
        _fetch_verified(store, vuri, f.name, f.sha256, cache, from_store=from_store).path for f in manifest.sparse.files
    ]
    folders = {p.parent for p in paths}
    assert len(folders) == 1, "a version's files live in one folder"
    index = SparseIndex.from_dir(folders.pop(), source=vuri)
    if index.num_docs != manifest.sparse.count:
        raise IndexIntegrityError(
            f"{vuri}: BM25 index holds {index.num_docs} documents, manifest says {manifest.sparse.count}"
        )
    return index
