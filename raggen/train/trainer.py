"""Ray Train wiring: a ``TrainJob`` (``raggen.app.training`` makes it from a config) -> ``TorchTrainer.fit()``.

Runs are named: ``RunConfig(name, storage_path)`` puts checkpoints under
``storage_path/name/``; starting a run again with the same name and storage path resumes from
its latest checkpoint (Ray Train V2 restores its checkpoint manager from the run folder and
``ray.train.get_checkpoint()`` returns the latest one). Worker failures restart the worker group
from the latest checkpoint up to ``max_failures`` times. S3 storage goes through a pyarrow
filesystem (``RunConfig(storage_filesystem=...)``) so a custom endpoint works.

After ``fit`` the latest checkpoint is exported to ``storage_path/name/final`` as a versioned,
verified model export (``final/<step>-<id>/`` + ``final/LATEST``; what Serve's ``model_dir`` and
``raggen eval --checkpoint`` read, see ``raggen.models.exports``). The resolved config goes to
``storage_path/name/config.yaml`` before the run starts (and into every checkpoint); rank 0 uploads
``metrics.jsonl`` (and ``tensorboard/``) beside them at each checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

from raggen.errors import ConfigError
from raggen.storage import check_relative_name, split_s3_uri
from raggen.train.checkpointing import CONFIG_FILE, export_checkpoint
from raggen.train.job import IndexTarget, TrainJob
from raggen.train.metrics import METRICS_FILE

log = logging.getLogger(__name__)

FINAL_DIR = "final"


def start_index_group(target: IndexTarget):
    """On the driver: when ``target`` is to be searched through shard actors (``index.search``),
    start ONE group for every worker (the caller puts it into the job) and return it; else None."""
    from raggen.index import ShardActorGroup
    from raggen.index.open_search import search_plan

    vuri, manifest, actors = search_plan(target.uri, target.version, target.search, target.s3)
    if not actors:
        return None
    return ShardActorGroup.start(
        vuri,
        settings=target.search,
        s3_options=target.s3,
        manifest=manifest,
        name=f"raggen-train-{manifest.version}-{os.getpid()}",
        source_uri=target.uri,
    )


def group_summary(group) -> dict[str, Any] | None:
    if group is None:
        return None
    try:
        infos = group.info()
    except Exception:  # noqa: BLE001 - e.g. ended by an index refresh during the run
        infos = []
    return {
        "name": group.name,
        "version": group.version,
        "actors": len(group.handles),
        "nodes": len({i["node_id"] for i in infos}),
        "queries": [i["queries"] for i in infos],
    }


def run_uri(storage_path: str, name: str) -> str:
    """The run's folder or prefix in storage: checkpoints, ``final/``, ``config.yaml``, ``metrics.jsonl``.
    A name or S3 prefix with '..', '.', empty segments or a leading '/' is refused (ValueError)."""
    if storage_path.startswith("s3://"):
        _bucket_path(storage_path)
    return f"{storage_path.rstrip('/')}/{check_relative_name(name, allow_empty=False)}"


def _bucket_path(storage_path: str) -> str:
    """``bucket/prefix`` of an ``s3://`` storage path, its prefix checked (``raggen.storage.split_s3_uri``)."""
    bucket, key = split_s3_uri(storage_path)
    return f"{bucket}/{key}".rstrip("/")


def run_index_uri(storage_path: str, name: str) -> str:
    """Where a run publishes its refreshed indexes (the starting index is never written to)."""
    return f"{run_uri(storage_path, name)}/index"


# ---------------------------------------------------------------------------------------------
# Data, storage, trainer (the config-reading half is raggen.app.training)
# ---------------------------------------------------------------------------------------------


def qa_items(path: str, limit: int | None = None, s3: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """QA examples (a local file or ``s3://`` object) as plain rows (what ``TrainJob.train_rows``
    holds); answer lists are JSON strings so ragged lists stay one column."""
    from raggen.corpus.qa import read_qa
    from raggen.storage import is_s3_uri

    if not is_s3_uri(path) and not os.path.exists(path):
        raise ConfigError(f"train.train_file: {path}: no such file (run `raggen world` or point it at a QA file)")
    examples = read_qa(path, s3_options=s3)
    examples = examples[:limit] if limit else examples
    return [
        {
            "id": ex.id,
            "question": ex.question,
            "answers": json.dumps(ex.answers),
            "gold": json.dumps(ex.gold_passage_ids),
        }
        for ex in examples
    ]


def storage_target(storage_path: str, s3: dict[str, Any] | None = None):
    """(path, filesystem) for RunConfig: a local folder made absolute, or ``bucket/prefix`` plus a
    pyarrow S3 filesystem carrying the endpoint/region/credentials."""
    if storage_path.startswith("s3://"):
        from raggen.storage import pyarrow_s3_filesystem

        return _bucket_path(storage_path), pyarrow_s3_filesystem(s3)
    return os.path.abspath(os.path.expanduser(storage_path)), None


def local_run_dir(storage_path: str, name: str) -> str:
    """The run's folder on this machine: the run folder itself for local storage, else a local
    scratch folder mirroring the S3 prefix (for files that must exist as local files)."""
    check_relative_name(name, allow_empty=False)  # never a path outside the run's folder
    if storage_path.startswith("s3://"):
        return os.path.join(tempfile.gettempdir(), "raggen-runs", _bucket_path(storage_path), name)
    return os.path.join(os.path.abspath(os.path.expanduser(storage_path)), name)


def local_metrics_path(storage_path: str, name: str) -> str:
    """Rank 0's JSONL, in ``local_run_dir`` (the file is also copied into every checkpoint, so it
    reaches S3 with them)."""
    return os.path.join(local_run_dir(storage_path, name), METRICS_FILE)


def make_trainer(
    job: TrainJob,
    items: list[dict[str, Any]],
    *,
    name: str,
    storage_path: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 0,
    num_to_keep: int | None = 2,
    s3: dict[str, Any] | None = None,
):
    """A TorchTrainer running ``train_func`` on ``num_workers`` workers over ``items`` (put in the
    object store once; each worker reads its ``rank_share``)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raggen.train.loop import train_func

    if not items:
        raise ConfigError("train.train_file: no training examples")
    if len(items) < num_workers:
        raise ConfigError(f"train.num_workers: {num_workers} workers but only {len(items)} training examples")
    path, filesystem = storage_target(storage_path, s3)
    run_config = RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
    )
    return TorchTrainer(
        train_func,
        train_loop_config=job.replace(train_rows=ray.put(items)).as_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=run_config,
    )


def export_final(checkpoint, storage_path: str, name: str, s3: dict[str, Any] | None = None) -> str:
    """Export the run's latest checkpoint as a new model export under ``storage_path/name/final``
    (``final/<step>-<id>/`` with each file's sha256, then ``final/LATEST``, written last: a reader
    never takes a partial export for a complete one). Returns ``final``'s URI, what ``serve.model_dir``
    and ``raggen eval --checkpoint`` name."""
    dst = f"{storage_path.rstrip('/')}/{name}/{FINAL_DIR}"
    if not dst.startswith("s3://"):
        dst = os.path.abspath(os.path.expanduser(dst))
    with checkpoint.as_directory() as src:
        export_checkpoint(src, dst, s3)
    return dst


def save_run_config(text: str, storage_path: str, name: str, s3: dict[str, Any] | None = None) -> str:
    """Write the resolved config to ``<storage_path>/<name>/config.yaml`` (a rerun of the same name
    overwrites it: each checkpoint keeps the config that produced it); returns the URI."""
    from raggen.storage import write_bytes

    uri = f"{run_uri(storage_path, name)}/{CONFIG_FILE}"
    write_bytes(uri if uri.startswith("s3://") else os.path.abspath(os.path.expanduser(uri)), text.encode("utf-8"), s3)
    return uri


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    if use_gpu is not None:
        return use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
