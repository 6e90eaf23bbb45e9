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
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raggen.errors import ConfigError, DataError
from raggen.index.build_settings import IndexBuildSettings
from raggen.index.encoder_actor import PassageEncoderActor, encoder_pool, tokenize_task_limit
from raggen.index.manifest import shard_file_names
from raggen.index.passage_table import passages_table
from raggen.index.passage_tokens import load_passage_tokenizer, tokenize_batch
from raggen.index.shard_split import _user_errors, split_by_shard, split_folder_uri, split_location
from raggen.index.work_dir import (
    EncodedCorpus,
    EncodedShard,
    _write_json,
    check_run_signature,
    encoded_shard_done,
    encoder_dim,
    lock_work_dir,
    resolved_passage_format,
    run_signature,
)
from raggen.models.specs import EncoderSpec
from raggen.storage import AtomicFile, sha256_file

logger = logging.getLogger(__name__)

ROW_ID_SHIFT = 40  # row_id = shard << 40 | position: up to ~1.1e12 passages per shard


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
    encoder: EncoderSpec,
    settings: IndexBuildSettings | None = None,
    passages_format: str = "auto",
    s3_options: Mapping[str, Any] | None = None,
    split_uri: str | None = None,
    torch_threads: int | None = None,
    tokenize_num_cpus: float = 0.25,
    sub_batch_tokens: int = 16384,
    progress: Callable[[int], None] | None = None,
) -> EncodedCorpus:
    """Encode every passage once into ``work_dir/encoded/shard-K.parquet``; resumes unfinished runs.

    ``encoder``: the model and how it turns a passage into a vector. From ``settings`` (None:
    ``IndexBuildSettings()``):
    ``batch_size``, ``num_shards`` and the encoder actor pool (``num_actors``, ``actor_num_cpus``,
    ``actor_num_gpus``; sized by ``encoder_pool``: ``num_actors=None`` from the cluster's free
    resources, ``actor_num_gpus=None`` one GPU per actor when the cluster has GPUs, none otherwise);
    ``torch_threads``: each actor's (default: from ``actor_num_cpus``); the other fields are
    ``build_index``'s.
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
    if tokenize_num_cpus <= 0 or sub_batch_tokens < 1:
        raise ConfigError("tokenize_num_cpus and sub_batch_tokens: must be > 0")
    settings = settings if settings is not None else IndexBuildSettings()
    work_dir = Path(work_dir)
    num_shards, name_or_path = settings.num_shards, encoder.name_or_path
    signature = run_signature(passages_uri, encoder_name_or_path=name_or_path, passages_format=passages_format,
                              num_shards=num_shards, pooling=encoder.pooling, max_length=encoder.max_length,
                              normalize=encoder.normalize, passage_format=encoder.passage_format,
                              passage_prefix=encoder.passage_prefix, s3_options=s3_options)  # fmt: skip
    info, lock = lock_work_dir(work_dir)
    try:
        check_run_signature(work_dir, signature)
        dim = encoder_dim(name_or_path, s3_options)
        finished = {s: e for s in range(num_shards) if (e := encoded_shard_done(work_dir, s)) is not None}
        pending = [s for s in range(num_shards) if s not in finished]
        if pending:
            logger.info("encoding shards %s (%d already done)", pending, len(finished))
            # sized from what the cluster has free before this run's own read tasks take any of it
            pool = encoder_pool(settings.num_actors, settings.actor_num_cpus, settings.actor_num_gpus, torch_threads)
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
                tokenizer=load_passage_tokenizer(name_or_path, s3_options),
                max_length=encoder.max_length,
                passage_format=resolved_passage_format(name_or_path, encoder.passage_format, s3_options),
                prefix=encoder.passage_prefix,
            )
            finished.update(
                _encode_pending(
                    str(passages_uri), work_dir, pending, counts, dim,
                    actor_kwargs=dict(name_or_path=name_or_path, pooling=encoder.pooling, max_length=encoder.max_length,
                                      normalize=encoder.normalize, passage_format=encoder.passage_format,
                                      passage_prefix=encoder.passage_prefix,
                                      s3_options=s3_options, sub_batch_tokens=sub_batch_tokens,
                                      torch_threads=pool["torch_threads"]),
                    tokenize_kwargs=tokenize_kwargs, batch_size=settings.batch_size, num_actors=pool["num_actors"],
                    actor_num_cpus=settings.actor_num_cpus, actor_num_gpus=pool["actor_num_gpus"],
                    tokenize_num_cpus=tokenize_num_cpus, split=split, progress=progress,
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
    actor_num_gpus: float,
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
        compute=ray.data.TaskPoolStrategy(size=tokenize_task_limit(num_actors, actor_num_gpus)),
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
        with _user_errors(), warnings.catch_warnings():
            # a corpus of one block: Ray Data says its tokenise tasks cannot all be busy, which is true and harmless
            warnings.filterwarnings(
                "ignore", message=r"The maximum number of concurrent tasks for 'MapBatches\(tokenize_batch\)'"
            )
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
