"""Ray Train wiring: the config -> a plain ``train_loop_config`` dict -> ``TorchTrainer.fit()``.

Runs are named: ``RunConfig(name, storage_path)`` puts checkpoints under
``storage_path/name/``; starting a run again with the same name and storage path resumes from
its latest checkpoint (Ray Train V2 restores its checkpoint manager from the run folder and
``ray.train.get_checkpoint()`` returns the latest one). Worker failures restart the worker group
from the latest checkpoint up to ``max_failures`` times. S3 storage goes through a pyarrow
filesystem (``RunConfig(storage_filesystem=...)``) so a custom endpoint works.

After ``fit`` the latest checkpoint is exported to ``storage_path/name/final`` (what Serve's
``model_dir`` and ``raggen eval --checkpoint`` read). The resolved config goes to
``storage_path/name/config.yaml`` before the run starts (and into every checkpoint); rank 0 uploads
``metrics.jsonl`` (and ``tensorboard/``) beside them at each checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raggen.errors import ConfigError, RaggenError
from raggen.train.checkpointing import CONFIG_FILE, STATE_FILE, copy_checkpoint
from raggen.train.metrics import METRICS_FILE
from raggen.train.sinks import TENSORBOARD_DIR, require_mlflow, summary_writer_class

if TYPE_CHECKING:  # the config only types the builder's input; no module below imports it at run time
    from raggen.config import ModelSection, RaggenConfig, S3Config, TrainSection

log = logging.getLogger(__name__)

FINAL_DIR = "final"


# ---------------------------------------------------------------------------------------------
# Config -> plain dict
# ---------------------------------------------------------------------------------------------


def s3_options(s3: "S3Config | None") -> dict[str, Any] | None:
    """The config's S3 section as ``raggen.storage.S3Options`` fields (None when all unset)."""
    return s3.storage_options() if s3 is not None else None


def _encoder_spec(section) -> dict[str, Any] | None:
    if section is None:
        return None
    return section.model_dump()


def model_spec(model: "ModelSection") -> dict[str, Any]:
    return {
        "query_encoder": _encoder_spec(model.query_encoder),
        "posterior_encoder": _encoder_spec(model.posterior_encoder),
        "generator": model.generator,
        "reranker": model.reranker,
        "max_source_length": model.max_source_length,
        "max_target_length": model.max_target_length,
    }


def step_spec(train: "TrainSection") -> dict[str, Any]:
    """``raggen.train.step.StepSettings`` fields. The JSA temperature also scales VRAG's p and q,
    so the two posterior-retriever estimators are compared at the same temperature."""
    gumbel = train.estimator == "gumbel-rerank"
    return {
        "estimator": train.estimator,
        "top_k": train.top_k,
        "retriever_temperature": train.jsa.retriever_temperature,
        "num_proposals": train.jsa.num_proposals,
        "length_normalize": train.jsa.length_normalize,
        "train_generator": train.gumbel.train_reader if gumbel else train.train_generator,
        "vrag_beta": train.vrag_beta,
        "pdist_temperature": train.pdist_temperature,
        "gumbel_k": train.gumbel.k,
        "gumbel_tau": train.gumbel.tau,
        "gumbel_method": train.gumbel.method,
        "gumbel_candidates": train.gumbel.candidates,
    }


def config_yaml(cfg: "RaggenConfig") -> str:
    """The full validated config as YAML (``load_config`` of it gives ``cfg`` back): saved with the run."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def sinks_spec(t: "TrainSection") -> dict[str, Any]:
    """``raggen.train.sinks.open_sinks`` input; a missing optional package fails here, on the driver."""
    spec: dict[str, Any] = {"tensorboard_dir": None, "mlflow": None}
    if t.tensorboard:
        summary_writer_class()
        spec["tensorboard_dir"] = os.path.join(local_run_dir(t.storage_path, t.name), TENSORBOARD_DIR)
    if t.mlflow_tracking_uri:
        require_mlflow()
        spec["mlflow"] = {"tracking_uri": t.mlflow_tracking_uri, "experiment": t.mlflow_experiment, "run_name": t.name,
                          "params": t.model_dump(mode="json", exclude={"s3"})}
    return spec


def train_loop_config(cfg: "RaggenConfig", metrics_path: str | None = None, use_gpu: bool = False) -> dict[str, Any]:
    """Everything ``raggen.train.loop.train_func`` reads, as plain JSON-able values."""
    t = cfg.train
    if t.train_passage_encoder and t.estimator == "gumbel-rerank":
        raise ConfigError("train.train_passage_encoder: gumbel-rerank keeps the retriever fixed; set it to false")
    passage_encoder = passage_encoder_spec(cfg) if t.train_passage_encoder else None  # reads the manifest once
    return {
        "steps": t.steps,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "retriever_lr": t.retriever_lr,
        "warmup_steps": t.warmup_steps,
        "lr_schedule": t.lr_schedule,
        "log_every": t.log_every,
        "weight_decay": t.weight_decay,
        "grad_clip": t.grad_clip,
        "seed": t.seed,
        "checkpoint_every": t.checkpoint_every,
        "eval_every": t.eval_every,
        "eval_examples": t.eval_examples,
        "dev_file": t.dev_file if t.eval_every else None,
        "metrics_path": metrics_path,
        "run_uri": run_uri(t.storage_path, t.name),
        "run_s3": s3_options(t.s3),
        "config_yaml": config_yaml(cfg),
        "sinks": sinks_spec(t),
        "use_gpu": use_gpu,
        "num_threads": max(1, int(t.cpus_per_worker)),
        "jsa_restart_chains": t.jsa.restart_chains,
        "step": step_spec(t),
        "models": {**model_spec(cfg.model), "passage_encoder": passage_encoder},
        "index": index_spec(cfg),
        "train_passage_encoder": t.train_passage_encoder,
        "refresh": refresh_spec(cfg, passage_encoder) if t.refresh_index_every else None,
    }


def index_spec(cfg: "RaggenConfig") -> dict[str, Any]:
    """How workers open ``train.index``: with the ``index.search`` settings (local, shard actors,
    nprobe / efSearch); ``run_training`` adds ``group`` (the shard actors it started) when the
    settings ask for actors."""
    return {"uri": cfg.train.index, "version": None, "s3": s3_options(cfg.train.s3),
            "search": cfg.index.search.model_dump(mode="json")}


def start_index_group(loop_config: dict[str, Any]):
    """On the driver: when ``train.index`` is to be searched through shard actors, start ONE group
    for every worker (its handles go into the loop config) and return it; else None."""
    from raggen.index import SearchSettings, ShardActorGroup
    from raggen.index.build import search_plan

    spec = loop_config["index"]
    settings = SearchSettings(**spec["search"])
    vuri, manifest, actors = search_plan(spec["uri"], spec.get("version"), settings, spec.get("s3"))
    if not actors:
        return None
    group = ShardActorGroup.start(vuri, settings=settings, s3_options=spec.get("s3"), manifest=manifest,
                                  name=f"raggen-train-{manifest.version}-{os.getpid()}", source_uri=spec["uri"])
    loop_config["index"] = {**spec, "version": group.version, "group": group}
    return group


def _group_summary(group) -> dict[str, Any] | None:
    if group is None:
        return None
    try:
        infos = group.info()
    except Exception:  # noqa: BLE001 - e.g. ended by an index refresh during the run
        infos = []
    return {"name": group.name, "version": group.version, "actors": len(group.handles),
            "nodes": len({i["node_id"] for i in infos}), "queries": [i["queries"] for i in infos]}


def passage_encoder_spec(cfg: "RaggenConfig") -> dict[str, Any]:
    """d(z) as the searched index was computed: encoder, pooling and normalisation from the manifest of
    ``train.index`` (so trained d(z) starts equal to the stored vectors even if ``index.encoder`` names
    another model), ``max_length`` from ``index.encoder`` (refreshes encode with that section)."""
    from raggen.index import read_manifest

    spec = _encoder_spec(cfg.index.encoder)
    try:
        encoder = read_manifest(cfg.train.index, s3_options=s3_options(cfg.train.s3)).encoder
    except (RaggenError, FileNotFoundError) as exc:
        raise ConfigError(f"train.index: {cfg.train.index}: cannot read its manifest ({exc})") from None
    if encoder.name_or_path != spec["name_or_path"]:
        log.warning("train.index was encoded with %s, index.encoder names %s: the trained passage encoder "
                    "starts from the index's", encoder.name_or_path, spec["name_or_path"])
    return {**spec, "name_or_path": encoder.name_or_path, "pooling": encoder.pooling, "normalize": encoder.normalize,
            "passage_format": encoder.passage_format, "s3": s3_options(cfg.train.s3)}


def run_uri(storage_path: str, name: str) -> str:
    """The run's folder or prefix in storage: checkpoints, ``final/``, ``config.yaml``, ``metrics.jsonl``."""
    return f"{storage_path.rstrip('/')}/{name}"


def run_index_uri(storage_path: str, name: str) -> str:
    """Where a run publishes its refreshed indexes (the starting index is never written to)."""
    return f"{run_uri(storage_path, name)}/index"


def refresh_spec(cfg: "RaggenConfig", passage_encoder: dict[str, Any]) -> dict[str, Any]:
    """``raggen.train.refresh.RefreshSpec`` fields: the index section's build settings, publishing
    into the run's own index root; ``passage_encoder`` is ``passage_encoder_spec(cfg)``."""
    t = cfg.train
    from raggen.indexing import index_build_kwargs

    build = index_build_kwargs(cfg.index)  # documents are chunked once; the refresh reads the passages
    passages_uri = build["passages_uri"]
    for key in ("passages_uri", "output_uri", "encoder_name_or_path", "version", "s3_options"):
        build.pop(key)
    # the refreshed vectors are d(z) as the trained encoder computes it
    build.update(pooling=passage_encoder["pooling"], normalize=passage_encoder["normalize"],
                 passage_format=passage_encoder["passage_format"])
    staging = os.path.join(local_run_dir(t.storage_path, t.name), "refresh")  # encoder snapshots: local folders
    snapshots = f"{t.storage_path.rstrip('/')}/{t.name}/refresh" if t.storage_path.startswith("s3://") else None
    return {"every": t.refresh_index_every, "passages_uri": passages_uri,
            "output_uri": run_index_uri(t.storage_path, t.name), "staging_dir": staging,
            "build": build, "s3": s3_options(t.s3), "snapshot_uri": snapshots}


# ---------------------------------------------------------------------------------------------
# Data, storage, trainer
# ---------------------------------------------------------------------------------------------


def qa_items(path: str, limit: int | None = None, s3: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """QA examples (a local file or ``s3://`` object) as Ray Data rows; answer lists are JSON strings
    so ragged lists stay one column."""
    from raggen.corpus.qa import read_qa
    from raggen.storage import is_s3_uri

    if not is_s3_uri(path) and not os.path.exists(path):
        raise ConfigError(f"train.train_file: {path}: no such file (run `raggen world` or point it at a QA file)")
    examples = read_qa(path, s3_options=s3)
    examples = examples[:limit] if limit else examples
    return [
        {"id": ex.id, "question": ex.question, "answers": json.dumps(ex.answers), "gold": json.dumps(ex.gold_passage_ids)}
        for ex in examples
    ]


def storage_target(storage_path: str, s3: dict[str, Any] | None = None):
    """(path, filesystem) for RunConfig: a local folder made absolute, or ``bucket/prefix`` plus a
    pyarrow S3 filesystem carrying the endpoint/region/credentials."""
    if storage_path.startswith("s3://"):
        from raggen.storage import pyarrow_s3_filesystem

        return storage_path[len("s3://"):].rstrip("/"), pyarrow_s3_filesystem(s3)
    return os.path.abspath(os.path.expanduser(storage_path)), None


def local_run_dir(storage_path: str, name: str) -> str:
    """The run's folder on this machine: the run folder itself for local storage, else a local
    scratch folder mirroring the S3 prefix (for files that must exist as local files)."""
    if storage_path.startswith("s3://"):
        where = storage_path[len("s3://"):].strip("/")
        return os.path.join(tempfile.gettempdir(), "raggen-runs", where, name)
    return os.path.join(os.path.abspath(os.path.expanduser(storage_path)), name)


def local_metrics_path(storage_path: str, name: str) -> str:
    """Rank 0's JSONL, in ``local_run_dir`` (the file is also copied into every checkpoint, so it
    reaches S3 with them)."""
    return os.path.join(local_run_dir(storage_path, name), METRICS_FILE)


def make_trainer(
    loop_config: dict[str, Any],
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
    """A TorchTrainer running ``train_func`` on ``num_workers`` workers over ``items``."""
    import ray.data
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
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=run_config,
        datasets={"train": ray.data.from_items(items)},
    )


def export_final(checkpoint, storage_path: str, name: str, s3: dict[str, Any] | None = None) -> str:
    """Copy the run's latest checkpoint to ``storage_path/name/final``; the state file goes last,
    so a reader never sees a partial export as complete."""
    dst = f"{storage_path.rstrip('/')}/{name}/{FINAL_DIR}"
    with checkpoint.as_directory() as src:
        if not dst.startswith("s3://"):
            copy_checkpoint(src, os.path.abspath(os.path.expanduser(dst)))
            return os.path.abspath(os.path.expanduser(dst))
        from raggen.storage import open_store

        store = open_store(dst, s3)
        names = sorted(p.relative_to(src).as_posix() for p in Path(src).rglob("*") if p.is_file())
        for rel in [n for n in names if n != STATE_FILE] + [STATE_FILE]:
            store.upload_file(Path(src, rel), rel)
    return dst


def save_run_config(text: str, storage_path: str, name: str, s3: dict[str, Any] | None = None) -> str:
    """Write the resolved config to ``<storage_path>/<name>/config.yaml`` (a rerun of the same name
    overwrites it: each checkpoint keeps the config that produced it); returns the URI."""
    from raggen.storage import write_bytes

    uri = f"{run_uri(storage_path, name)}/{CONFIG_FILE}"
    write_bytes(uri if uri.startswith("s3://") else os.path.abspath(os.path.expanduser(uri)), text.encode("utf-8"), s3)
    return uri


def _resolve_use_gpu(use_gpu: bool | None) -> bool:
    if use_gpu is not None:
        return use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def run_training(cfg: "RaggenConfig", extra_loop_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train as the config says (starting Ray if needed); returns a JSON-able summary."""
    from raggen.ray_utils import ensure_ray

    t = cfg.train
    s3 = s3_options(t.s3)
    metrics_path = local_metrics_path(t.storage_path, t.name)
    loop_config = {**train_loop_config(cfg, metrics_path=metrics_path), **(extra_loop_config or {})}
    items = qa_items(t.train_file, s3=s3)  # config and data errors surface before Ray starts
    config_uri = save_run_config(loop_config["config_yaml"], t.storage_path, t.name, s3)
    ensure_ray()
    use_gpu = loop_config["use_gpu"] = _resolve_use_gpu(t.use_gpu)
    group = start_index_group(loop_config)  # one group of shard actors for every worker (index.search)
    try:
        trainer = make_trainer(
            loop_config, items, name=t.name, storage_path=t.storage_path,
            num_workers=t.num_workers, use_gpu=use_gpu, cpus_per_worker=t.cpus_per_worker,
            max_failures=t.max_failures, s3=s3,
        )
        result = trainer.fit()
        index_group = _group_summary(group)
    finally:
        if group is not None:
            group.close()
    final = export_final(result.checkpoint, t.storage_path, t.name, s3) if result.checkpoint else None
    return {
        "index_group": index_group,
        "name": t.name,
        "run_dir": run_uri(t.storage_path, t.name),
        "config": config_uri,
        "final": final,
        "index": run_index_uri(t.storage_path, t.name) if t.refresh_index_every else t.index,
        "metrics_jsonl": metrics_path,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))},
    }
