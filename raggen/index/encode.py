"""Encode a passage corpus into per-shard parquet files with Ray Data, resumably.

Pipeline (one work dir per run)::

    read (DPR TSV / JSONL / parquet; folder or s3://)  -- a Ray Data datasource whose read tasks
         parse each file with raggen.corpus.readers (one validation stack: a bad row is a DataError
         naming the file and line or row), pyarrow S3 filesystem
      -> normalise columns, shard = crc32(passage id) % N  -- stable across runs and machines
      -> split/shard=K/*.parquet, split.json (counts)  [stage 1, redone if unfinished; with
         split_uri (shared storage on multi-node clusters) the split goes to a folder of its own,
         <split_uri>/raggen-split-<work dir id>, marked and removed only by raggen]
      -> map_batches(tokenize_batch)  -- plain CPU tasks: fixed-width int32 token columns + num_tokens
      -> map_batches(PassageEncoderActor, ActorPoolStrategy(size=num_actors), explicit batch_size,
                     num_gpus=1 per actor on GPU clusters, else num_cpus=actor_num_cpus)
                     -- only the model: length buckets, padding trimmed, bf16 on CUDA; token columns dropped
      -> the driver streams rows into encoded/shard-K.parquet (row_id, id, title, text, embedding)
         and marks each finished shard with encoded/shard-K.done.json (count + sha256)   [stage 2]

A run that dies restarts with only the unfinished shards (done markers are checked against the
file's sha256); ``preserve_order`` makes shards finish one after another, so little is lost. A
work dir belongs to one run signature: the corpus content (size + mtime of local files, ETag + size
of S3 objects), the encoder (and its files when it is a folder) and every setting that changes the
vectors; a work dir made for another signature is refused. Work dirs carry a ``.raggen-work``
marker (raggen deletes only folders with it) and are locked while a run uses them.
Row ids are ``shard << 40 | position``: unique over the whole index, and the shard is readable
from the id. S3 input is read in place through ``pyarrow.fs.S3FileSystem`` built from the same
endpoint/credentials as the boto3 client (``raggen.storage.pyarrow_s3_filesystem``), so large
corpora are never copied to the driver; for a small corpus on an unusual store, download it first
(``raggen.storage.download``) and pass the local path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raggen.errors import ConfigError, DataError, RaggenError, find_user_error
from raggen.index.manifest import passages_table, shard_file_names
from raggen.index.passage_source import (  # noqa: F401 - moved there, importable from here as before
    _DATASOURCE,
    _is_single_file,
    _passage_datasource,
    _paths_and_filesystem,
    detect_format,
    normalize_passages,
    read_passages_dataset,
    stable_shard,
)
from raggen.index.work_dir import (  # noqa: F401 - moved there, importable from here as before
    WORK_LOCK,
    WORK_MARKER,
    EncodedCorpus,
    EncodedShard,
    _read_json,
    _write_json,
    check_run_signature,
    encoded_shard_done,
    encoder_dim,
    lock_work_dir,
    remove_work_dir,
    resolved_passage_format,
    run_signature,
)
from raggen.storage import (
    AtomicFile,
    claim_folder,
    is_s3_uri,
    join_uri,
    open_store,
    owns_folder,
    pyarrow_s3_filesystem,
    release_folder,
    sha256_file,
    split_s3_uri,
)

logger = logging.getLogger(__name__)

ROW_ID_SHIFT = 40  # row_id = shard << 40 | position: up to ~1.1e12 passages per shard
SPLIT_MARKER = ".raggen-split"  # in every split folder raggen made


# ------------------------------------------------------------------------------------------ stage 2a: tokenise (CPU tasks)

#: the token columns the tokenise stage emits (those the tokenizer makes), each (b, max_length) int32
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
NUM_TOKENS = "num_tokens"  # (b,) int32: real tokens per row, what the actor buckets by
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf")


def load_passage_tokenizer(name_or_path: str, s3_options: Mapping[str, Any] | None = None):
    """The encoder's tokenizer alone, loaded once on the driver and shipped to the tokenise tasks
    (so no task downloads a model); of an ``s3://`` folder only the small non-weight files are fetched."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from raggen.models.loading import resolve_model_path

    if not is_s3_uri(name_or_path):
        return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    store = open_store(name_or_path, s3_options)
    tmp = tempfile.mkdtemp(prefix="raggen-tokenizer-")
    try:
        for name in store.list():
            if not name.lower().endswith(_WEIGHT_SUFFIXES):
                store.download_file(name, Path(tmp, name))
        return AutoTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pad_to_width(x: np.ndarray, width: int, value: int, side: str) -> np.ndarray:
    """(b, t) -> (b, width) int32, padded on the tokenizer's padding side."""
    out = np.full((x.shape[0], width), value, dtype=np.int32)
    if side == "left":
        out[:, width - x.shape[1] :] = x
    else:
        out[:, : x.shape[1]] = x
    return out


def tokenize_batch(
    batch: dict[str, np.ndarray], *, tokenizer, passage_format: str, max_length: int
) -> dict[str, np.ndarray]:
    """Stage 2a: title/text -> fixed-width token columns (b, max_length) int32 + ``num_tokens`` (b,).

    A pure function of the tokenizer, run as plain CPU tasks, so the encoder actor (the GPU) only
    runs the model. Fixed width keeps every block's columns one shape; the actor trims the padding.
    """
    from raggen.models.retriever import tokenize_passages

    titles, texts = [str(t) for t in batch["title"]], [str(t) for t in batch["text"]]
    out = dict(batch)
    if not texts:
        names = [c for c in TOKEN_COLUMNS if c != "token_type_ids" or c in tokenizer.model_input_names]
        out.update({c: np.zeros((0, max_length), np.int32) for c in names})
        out[NUM_TOKENS] = np.zeros(0, np.int32)
        return out
    enc = tokenize_passages(tokenizer, titles, texts, passage_format=passage_format, max_length=max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for name in TOKEN_COLUMNS:
        if name in enc:
            value = pad_id if name == "input_ids" else 0
            out[name] = _pad_to_width(enc[name].numpy(), max_length, value, tokenizer.padding_side)
    out[NUM_TOKENS] = out["attention_mask"].sum(axis=1, dtype=np.int32)
    return out


# ------------------------------------------------------------------------------------------ stage 2b: the encoder actor


def length_buckets(num_tokens: np.ndarray, *, max_rows: int, max_tokens: int) -> list[np.ndarray]:
    """Row indices grouped into sub-batches of similar length, shortest first.

    Rows sorted by length are cut greedily so that rows x longest row (the padded size the model
    sees) stays within ``max_tokens`` and rows within ``max_rows``; a row longer than the budget
    runs alone. Short rows thus share a sub-batch without paying for the long rows' padding.
    """
    order = np.argsort(num_tokens, kind="stable")
    buckets, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order):
            buckets.append(order[start:])
            break
        rows, longest = i - start + 1, int(num_tokens[order[i]])  # if row i joined the current bucket
        if rows > max_rows or rows * longest > max_tokens:
            buckets.append(order[start:i])
            start = i
    return buckets


def trim_padding(tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(r, width) -> (r, t): drop the columns that are padding in every row (either padding side)."""
    used = np.flatnonzero(tokens["attention_mask"].any(axis=0))
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
    return {name: col[:, lo:hi] for name, col in tokens.items()}


def embed_bucketed(
    encoder, tokens: dict[str, np.ndarray], num_tokens: np.ndarray, *, max_rows: int, max_tokens: int
) -> np.ndarray:
    """Token columns (b, width) -> vectors (b, dim) float32, row i for input row i.

    The model runs on length buckets (:func:`length_buckets`), each trimmed to its longest row;
    the sub-batches' vectors stay on the device until the end (one host sync per call, so the
    next sub-batch is queued while the GPU works), then go back to the input order.
    ``encoder`` is a ``TextEncoder`` in eval mode.
    """
    import torch

    parts, rows_of = [], []
    with torch.inference_mode():
        for rows in length_buckets(num_tokens, max_rows=max_rows, max_tokens=max_tokens):
            sub = trim_padding({name: col[rows] for name, col in tokens.items()})  # (r, t) each
            batch = {name: torch.from_numpy(col).to(encoder.device).long() for name, col in sub.items()}
            parts.append(encoder.embed(batch))  # (r, dim), on the device
            rows_of.append(rows)
        if not parts:
            return np.zeros((0, encoder.dim), np.float32)
        vectors = torch.cat(parts).float().cpu().numpy()  # (b, dim) in bucket order
    out = np.empty_like(vectors)
    out[np.concatenate(rows_of)] = vectors
    return out


class PassageEncoderActor:
    """Ray Data callable class: the model is loaded once per actor and only runs the model.

    Input rows carry the token columns of :func:`tokenize_batch` (a batch without them, from a
    caller using the actor alone, is tokenised here). Each batch is encoded in length buckets of
    at most ``sub_batch_tokens`` padded tokens (:func:`embed_bucketed`). CUDA + bf16 when the
    actor has a GPU, CPU + fp32 otherwise (raggen.devices). Output: the input columns minus the
    token columns, plus ``embedding`` (b, dim) float32, rows in input order.
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: str = "mean",
        max_length: int = 256,
        normalize: bool = False,
        torch_threads: int | None = None,
        s3_options: Mapping[str, Any] | None = None,
        passage_format: str | None = None,
        sub_batch_tokens: int = 16384,
    ):
        import torch

        from raggen.devices import pick_device, pick_dtype
        from raggen.models.loading import fetch_model_dir
        from raggen.models.retriever import TextEncoder

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        device = pick_device()
        self.encoder = TextEncoder.from_pretrained(
            fetch_model_dir(name_or_path, s3_options),
            pooling=pooling,
            max_length=max_length,
            normalize=normalize,
            device=device,
            dtype=pick_dtype(device),
            passage_format=passage_format,
        ).eval()
        self.max_length, self.sub_batch_tokens = max_length, sub_batch_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "input_ids" not in batch:
            batch = tokenize_batch(
                batch,
                tokenizer=self.encoder.tokenizer,
                passage_format=self.encoder.passage_format,
                max_length=self.max_length,
            )
        tokens = {name: np.asarray(batch[name]) for name in TOKEN_COLUMNS if name in batch}
        num_tokens = np.asarray(batch[NUM_TOKENS])
        emb = embed_bucketed(
            self.encoder, tokens, num_tokens, max_rows=max(1, len(num_tokens)), max_tokens=self.sub_batch_tokens
        )  # (b, dim) float32
        rest = {name: col for name, col in batch.items() if name not in TOKEN_COLUMNS and name != NUM_TOKENS}
        return {**rest, "embedding": emb}


# ------------------------------------------------------------------------------------------ stage 1: split


def split_folder_uri(work_dir: Path, split_uri: str | None, work_id: str) -> str:
    """Where stage 1 writes: ``work_dir/split``, or a folder of this work dir's own under
    ``split_uri`` (``<split_uri>/raggen-split-<work id>``): runs that share a ``split_uri`` never
    share (or delete) each other's split, and nothing else in ``split_uri`` is touched."""
    if split_uri is None:
        return str(work_dir / "split")
    return join_uri(str(split_uri), f"raggen-split-{work_id}")


def split_location(uri: str, s3_options) -> tuple[str, Any]:
    """(path for Ray Data, pyarrow filesystem or None) of a split folder URI.

    Ray Data's write tasks run on every node: on a multi-node cluster the split must live on
    storage they all reach (``split_uri="s3://bucket/tmp/split"`` or a shared file system).
    """
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        return f"{bucket}/{key}", pyarrow_s3_filesystem(s3_options)
    return str(Path(uri)), None


def _fs(fs):
    from pyarrow import fs as pafs

    return fs or pafs.LocalFileSystem()


def split_by_shard(
    passages_uri: str,
    work_dir: Path,
    *,
    format: str,
    num_shards: int,
    s3_options,
    split_uri: str | None = None,
    work_id: str = "0",
) -> list[int]:
    """Write <split>/shard=K/*.parquet with Ray Data; returns the count per shard.

    The counts are cached in work_dir/split.json; an unfinished split is redone from scratch in a
    split folder raggen owns (``.raggen-split`` marker); a folder without the marker is refused."""
    from pyarrow import fs as pafs

    uri = split_folder_uri(work_dir, split_uri, work_id)
    path, fs = split_location(uri, s3_options)
    done = _read_json(work_dir / "split.json")
    if done is not None and len(done.get("counts", [])) == num_shards and done.get("split") == path:
        return [int(c) for c in done["counts"]]
    if owns_folder(uri, SPLIT_MARKER, s3_options):
        release_folder(uri, SPLIT_MARKER, s3_options=s3_options)  # an unfinished split of ours
    claim_folder(uri, SPLIT_MARKER, what="split_uri", s3_options=s3_options)
    ds = read_passages_dataset(passages_uri, format=format, s3_options=s3_options, num_shards=num_shards)
    with _user_errors():
        ds.write_parquet(path, filesystem=fs, partition_cols=["shard"])
    filesystem = _fs(fs)
    counts = [0] * num_shards
    for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.is_file and info.path.endswith(".parquet"):
            shard = int(info.path.rsplit("shard=", 1)[1].split("/", 1)[0])
            with filesystem.open_input_file(info.path) as f:
                counts[shard] += pq.ParquetFile(f).metadata.num_rows
    if sum(counts) == 0:
        raise DataError(f"{passages_uri}: no passages found")
    _write_json(work_dir / "split.json", {"counts": counts, "source": passages_uri, "split": path, "uri": uri})
    return counts


# ------------------------------------------------------------------------------------------ stage 2: the pipeline


class _ShardWriter:
    """Streams one shard's rows to a temporary parquet file; finish() renames it and marks it done."""

    def __init__(self, work_dir: Path, shard: int, expected: int, source: str):
        self.shard, self.expected, self.source = shard, expected, source
        name = shard_file_names(shard)[1]
        self.path = work_dir / "encoded" / name
        self.marker = work_dir / "encoded" / f"{name}.done.json"
        self.file: AtomicFile | None = None  # a temporary name unique to this process and writer
        self.writer: pq.ParquetWriter | None = None
        self.count = 0
        self.seen: set[str] = set()

    def _open(self, schema: pa.Schema) -> None:
        self.file = AtomicFile(self.path, "wb", compress=False)
        self.writer = pq.ParquetWriter(self.file.file, schema)

    def abort(self) -> None:
        """Drop the unfinished file (its temporary name); the finished shard files are untouched."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.file is not None:
            self.file.abort()

    def append(self, ids, titles, texts, emb: np.ndarray) -> None:
        for pid in ids:
            if pid in self.seen:
                raise DataError(f"{self.source}: duplicate passage id {pid!r}")
            self.seen.add(pid)
        row_ids = (np.int64(self.shard) << ROW_ID_SHIFT) + np.arange(self.count, self.count + len(ids), dtype=np.int64)
        table = passages_table(row_ids, ids, titles, texts, emb)
        if self.writer is None:
            self._open(table.schema)
        self.writer.write_table(table)
        self.count += len(ids)

    def finish(self, dim: int) -> EncodedShard:
        if self.writer is None:  # an empty shard still gets a (typed, empty) file
            self._open(passages_table(np.zeros(0), [], [], [], np.zeros((0, dim))).schema)
        self.writer.close()
        self.file.commit()
        _write_json(self.marker, {"count": self.count, "sha256": sha256_file(self.path), "dim": dim})
        self.seen.clear()
        return EncodedShard(shard=self.shard, path=self.path, count=self.count)


def encode_passages(
    passages_uri: str,
    work_dir: str | os.PathLike,
    *,
    encoder_name_or_path: str,
    pooling: str = "mean",
    max_length: int = 256,
    normalize: bool = False,
    passage_format: str | None = None,
    batch_size: int = 64,
    num_shards: int = 1,
    num_actors: int = 1,
    actor_num_cpus: float = 1.0,
    actor_num_gpus: float | None = None,
    torch_threads: int | None = None,
    passages_format: str = "auto",
    s3_options: Mapping[str, Any] | None = None,
    split_uri: str | None = None,
    tokenize_num_cpus: float = 0.25,
    sub_batch_tokens: int = 16384,
    progress: Callable[[int], None] | None = None,
) -> EncodedCorpus:
    """Encode every passage once into ``work_dir/encoded/shard-K.parquet``; resumes unfinished runs.

    ``actor_num_gpus=None`` gives each actor one GPU when the cluster has GPUs, none otherwise.
    ``work_dir``: new, empty or made by raggen (``.raggen-work`` marker); locked while this runs;
    refused when it holds work of another run signature (:func:`run_signature`).
    ``split_uri``: where stage 1 writes (default ``work_dir/split``; on a multi-node cluster a
    folder every node reaches, e.g. ``s3://bucket/tmp/split``, under which this work dir gets a
    folder of its own). Encoded shards are written by this (the driver's) process into ``work_dir``. ``tokenize_num_cpus``: the CPU share of each
    tokenise task; ``sub_batch_tokens``: the padded-token budget of one model call in an actor
    (see :func:`length_buckets`); neither changes the vectors, so neither is in the run signature.
    ``progress(rows)`` is called on the driver after each batch of encoded rows is written.
    Needs a running Ray (``ray.init()`` in the entry point).
    """
    if num_shards < 1 or num_actors < 1 or batch_size < 1:
        raise ConfigError("num_shards, num_actors and batch_size: must all be >= 1")
    if tokenize_num_cpus <= 0 or sub_batch_tokens < 1:
        raise ConfigError("tokenize_num_cpus and sub_batch_tokens: must be > 0")
    work_dir = Path(work_dir)
    signature = run_signature(passages_uri, encoder_name_or_path=encoder_name_or_path, passages_format=passages_format,
                              num_shards=num_shards, pooling=pooling, max_length=max_length, normalize=normalize,
                              passage_format=passage_format, s3_options=s3_options)  # fmt: skip
    info, lock = lock_work_dir(work_dir)
    try:
        check_run_signature(work_dir, signature)
        dim = encoder_dim(encoder_name_or_path, s3_options)
        finished = {s: e for s in range(num_shards) if (e := encoded_shard_done(work_dir, s)) is not None}
        pending = [s for s in range(num_shards) if s not in finished]
        if pending:
            logger.info("encoding shards %s (%d already done)", pending, len(finished))
            counts = split_by_shard(
                str(passages_uri),
                work_dir,
                format=passages_format,
                num_shards=num_shards,
                s3_options=s3_options,
                split_uri=split_uri,
                work_id=info["id"],
            )
            split = split_location(split_folder_uri(work_dir, split_uri, info["id"]), s3_options)
            tokenize_kwargs = dict(
                tokenizer=load_passage_tokenizer(encoder_name_or_path, s3_options),
                max_length=max_length,
                passage_format=resolved_passage_format(encoder_name_or_path, passage_format, s3_options),
            )
            finished.update(
                _encode_pending(
                    str(passages_uri), work_dir, pending, counts, dim,
                    actor_kwargs=dict(name_or_path=encoder_name_or_path, pooling=pooling, max_length=max_length, normalize=normalize,
                                      passage_format=passage_format, s3_options=s3_options, sub_batch_tokens=sub_batch_tokens,
                                      torch_threads=torch_threads or max(1, int(round(actor_num_cpus)))),
                    tokenize_kwargs=tokenize_kwargs, batch_size=batch_size, num_actors=num_actors,
                    actor_num_cpus=actor_num_cpus, actor_num_gpus=actor_num_gpus, tokenize_num_cpus=tokenize_num_cpus,
                    split=split, progress=progress,
                )
            )  # fmt: skip
    finally:
        lock.release()
    return EncodedCorpus(shards=[finished[s] for s in range(num_shards)], dim=dim)


def _encode_pending(
    source: str,
    work_dir: Path,
    pending: list[int],
    counts: list[int],
    dim: int,
    *,
    actor_kwargs: dict,
    tokenize_kwargs: dict,
    batch_size: int,
    num_actors: int,
    actor_num_cpus: float,
    tokenize_num_cpus: float,
    actor_num_gpus: float | None,
    split: tuple[str, Any],
    progress: Callable[[int], None] | None = None,
) -> dict[int, EncodedShard]:
    import ray
    import ray.data

    writers = {s: _ShardWriter(work_dir, s, counts[s], source) for s in pending}
    done = {s: w.finish(dim) for s, w in writers.items() if counts[s] == 0}
    todo = [s for s in pending if counts[s] > 0]
    if not todo:
        return done
    if actor_num_gpus is None:
        actor_num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    split_path, split_fs = split
    split_dirs = [f"{split_path}/shard={s}" for s in todo]  # in shard order: with preserve_order, shards finish in turn
    ds = ray.data.read_parquet(split_dirs, filesystem=split_fs,
                               partitioning=ray.data.datasource.Partitioning("hive", field_types={"shard": int}))  # fmt: skip
    # blocks of a few batches: enough inputs to keep every actor busy even for a small corpus
    ds = ds.repartition(target_num_rows_per_block=batch_size * 2)
    # tokenising in plain CPU tasks keeps it off the encoder actor's (the GPU's) critical path
    ds = ds.map_batches(
        tokenize_batch,
        fn_kwargs=tokenize_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=tokenize_num_cpus,
    )
    ds = ds.map_batches(
        PassageEncoderActor,
        fn_constructor_kwargs=actor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=actor_num_cpus,
        num_gpus=actor_num_gpus or None,
    )
    ctx = ray.data.DataContext.get_current()
    keep_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # shards finish one after another -> cheap resumes
    try:
        with _user_errors():
            for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
                _route_batch(batch, writers, done, dim)
                if progress is not None:
                    progress(len(batch["id"]))
    except BaseException:
        for s, w in writers.items():
            if s not in done:
                w.abort()  # no temporary file is left behind
        raise
    finally:
        ctx.execution_options.preserve_order = keep_order
    unfinished = [s for s in todo if s not in done]
    if unfinished:
        raise DataError(f"{source}: shards {unfinished} got fewer rows than the split counted; rerun to resume")
    return done


def _route_batch(batch: dict[str, np.ndarray], writers: dict[int, _ShardWriter], done: dict, dim: int) -> None:
    shard_col = np.asarray(batch["shard"]).astype(np.int64)
    emb = np.asarray(batch["embedding"], dtype=np.float32)  # (b, dim)
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise ConfigError(f"encoder: produced embeddings of shape {emb.shape}, expected (b, {dim})")
    for s in np.unique(shard_col).tolist():
        rows = np.nonzero(shard_col == s)[0]
        w = writers[s]
        w.append(batch["id"][rows].tolist(), batch["title"][rows].tolist(), batch["text"][rows].tolist(), emb[rows])
        if w.count == w.expected:
            done[s] = w.finish(dim)
            logger.info("shard %d encoded: %d passages -> %s", s, w.count, w.path)


class _user_errors:
    """Re-raise a RaggenError raised inside a Ray task/actor as itself (one line, no Ray wrapper)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or (isinstance(exc, RaggenError) and type(exc).__module__ == "raggen.errors"):
            return False
        cause = find_user_error(exc)
        if cause is not None:
            raise cause from None
        return False
