"""``raggen train``: a config -> the typed ``TrainJob`` that ``raggen.train.loop.train_func``
reads -> a ``TorchTrainer`` run (``raggen.train.trainer``) -> the exported final checkpoint."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from raggen.errors import ConfigError, RaggenError
from raggen.models.specs import PassageEncoderSpec
from raggen.settings_util import section_part
from raggen.train.job import FailureInjection, IndexTarget, TrainJob
from raggen.train.refresh import RefreshSpec
from raggen.train.settings import LoopSettings, StepSettings
from raggen.train.sinks import TENSORBOARD_DIR, require_mlflow, summary_writer_class
from raggen.train.trainer import (
    export_final,
    group_summary,
    local_metrics_path,
    local_run_dir,
    make_trainer,
    qa_items,
    resolve_use_gpu,
    run_index_uri,
    run_uri,
    save_run_config,
    start_index_group,
)

if TYPE_CHECKING:
    from raggen.config import RaggenConfig, S3Config, TrainSection

log = logging.getLogger(__name__)


def s3_options(s3: S3Config | None) -> dict[str, Any] | None:
    """The config's S3 section as ``raggen.storage.S3Options`` fields (None when all unset)."""
    return s3.storage_options() if s3 is not None else None


def config_yaml(cfg: RaggenConfig) -> str:
    """The full validated config as YAML (``load_config`` of it gives ``cfg`` back): saved with the run."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def sinks_spec(t: TrainSection) -> dict[str, Any]:
    """``raggen.train.sinks.open_sinks`` input; a missing optional package fails here, on the driver."""
    spec: dict[str, Any] = {"tensorboard_dir": None, "mlflow": None}
    if t.tensorboard:
        summary_writer_class()
        spec["tensorboard_dir"] = os.path.join(local_run_dir(t.storage_path, t.name), TENSORBOARD_DIR)
    if t.mlflow_tracking_uri:
        require_mlflow()
        spec["mlflow"] = {
            "tracking_uri": t.mlflow_tracking_uri,
            "experiment": t.mlflow_experiment,
            "run_name": t.name,
            "params": t.model_dump(mode="json", exclude={"s3"}),
        }
    return spec


def train_job(cfg: RaggenConfig, metrics_path: str | None = None, use_gpu: bool = False) -> TrainJob:
    """Everything ``raggen.train.loop.train_func`` reads: the validated settings objects of the
    ``train`` and ``model`` sections themselves, plus what the driver resolves (paths, the index's
    passage encoder, sinks)."""
    t = cfg.train
    if t.train_passage_encoder and t.estimator == "gumbel-rerank":
        raise ConfigError("train.train_passage_encoder: gumbel-rerank keeps the retriever fixed; set it to false")
    passage_encoder = passage_encoder_spec(cfg) if t.train_passage_encoder else None  # reads the manifest once
    return TrainJob(
        loop=section_part(t, LoopSettings),
        step=section_part(t, StepSettings),
        models=cfg.model,
        index=IndexTarget(uri=t.index, search=cfg.index.search, s3=s3_options(t.s3)),
        run_uri=run_uri(t.storage_path, t.name),
        run_s3=s3_options(t.s3),
        config_yaml=config_yaml(cfg),
        metrics_path=metrics_path,
        passage_encoder=passage_encoder,
        refresh=refresh_spec(cfg, passage_encoder) if passage_encoder is not None and t.refresh_index_every else None,
        sinks=sinks_spec(t),
        dev_file=t.dev_file if t.eval_every else None,
        use_gpu=use_gpu,
        num_threads=max(1, int(t.cpus_per_worker)),
    )


def passage_encoder_spec(cfg: RaggenConfig) -> PassageEncoderSpec:
    """d(z) as the searched index was computed: encoder, pooling, normalisation and prompts from the manifest of
    ``train.index`` (so trained d(z) starts equal to the stored vectors even if ``index.encoder`` names
    another model), ``max_length`` from ``index.encoder`` (refreshes encode with that section)."""
    from raggen.index import read_manifest

    spec = cfg.index.encoder
    try:
        encoder = read_manifest(cfg.train.index, s3_options=s3_options(cfg.train.s3)).encoder
    except (RaggenError, FileNotFoundError) as exc:
        raise ConfigError(f"train.index: {cfg.train.index}: cannot read its manifest ({exc})") from None
    if encoder.name_or_path != spec.name_or_path:
        log.warning(
            "train.index was encoded with %s, index.encoder names %s: the trained passage encoder "
            "starts from the index's",
            encoder.name_or_path,
            spec.name_or_path,
        )
    return PassageEncoderSpec(
        name_or_path=encoder.name_or_path,
        pooling=encoder.pooling,
        max_length=spec.max_length,
        normalize=encoder.normalize,
        passage_format=encoder.passage_format,
        query_prefix=encoder.query_prefix,
        passage_prefix=encoder.passage_prefix,
        s3=s3_options(cfg.train.s3),
    )


def refresh_spec(cfg: RaggenConfig, passage_encoder: PassageEncoderSpec) -> RefreshSpec:
    """Where a refreshed index goes and how it is built: the index section's build settings,
    publishing into the run's own index root; ``passage_encoder`` is ``passage_encoder_spec(cfg)``."""
    t = cfg.train
    from raggen.app.indexing import corpus_passages, index_build_settings
    from raggen.models.specs import EncoderSpec

    passages_uri, passages_format = corpus_passages(cfg.index)  # documents are chunked once; refreshes read passages
    # the refreshed vectors are d(z) as the trained encoder computes it (its S3 settings travel as RefreshSpec.s3)
    encoder = EncoderSpec(**passage_encoder.model_dump(exclude={"s3"}))
    staging = os.path.join(local_run_dir(t.storage_path, t.name), "refresh")  # encoder snapshots: local folders
    snapshots = f"{t.storage_path.rstrip('/')}/{t.name}/refresh" if t.storage_path.startswith("s3://") else None
    return RefreshSpec(
        every=t.refresh_index_every,
        passages_uri=passages_uri,
        output_uri=run_index_uri(t.storage_path, t.name),
        staging_dir=staging,
        encoder=encoder,
        settings=index_build_settings(cfg.index),
        search=cfg.index.search,
        passages_format=passages_format,
        s3=s3_options(t.s3),
        snapshot_uri=snapshots,
    )


def check_trained_models(cfg: RaggenConfig) -> None:
    """The models the Train workers will load, checked where the user typed them (see
    :func:`raggen.models.loading.check_model_reference`)."""
    from raggen.models.loading import check_model_reference

    m = cfg.model
    fields = {"model.query_encoder.name_or_path": m.query_encoder.name_or_path, "model.generator": m.generator,
              "model.posterior_encoder.name_or_path": m.posterior_encoder and m.posterior_encoder.name_or_path,
              "model.reranker": m.reranker}  # fmt: skip
    if cfg.train.train_passage_encoder:
        fields["index.encoder.name_or_path"] = cfg.index.encoder.name_or_path
    for field, value in fields.items():
        if value:
            check_model_reference(field, value)


def run_training(cfg: RaggenConfig, inject_failure: FailureInjection | None = None) -> dict[str, Any]:
    """Train as the config says (starting Ray if needed); returns a JSON-able summary."""
    from raggen.ray_utils import ensure_ray
    from raggen.train.heldout import check_dev_file

    check_trained_models(cfg)
    t = cfg.train
    s3 = s3_options(t.s3)
    metrics_path = local_metrics_path(t.storage_path, t.name)
    job = train_job(cfg, metrics_path=metrics_path).replace(inject_failure=inject_failure)
    items = qa_items(t.train_file, s3=s3)  # config and data errors surface before Ray starts
    # held out means held out: dev questions that are also training questions are not scored
    if t.eval_every:  # the dev file is read only by the in-run eval
        job = job.replace(dev_exclude_ids=tuple(check_dev_file(items, job.dev_file, None, s3)))
    config_uri = save_run_config(job.config_yaml, t.storage_path, t.name, s3)
    ensure_ray()
    use_gpu = resolve_use_gpu(t.use_gpu)
    group = start_index_group(job.index)  # one group of shard actors for every worker (index.search)
    if group is not None:
        job = job.replace(index=job.index.replace(version=group.version, group=group))
    try:
        trainer = make_trainer(
            job.replace(use_gpu=use_gpu),
            items,
            name=t.name,
            storage_path=t.storage_path,
            num_workers=t.num_workers,
            use_gpu=use_gpu,
            cpus_per_worker=t.cpus_per_worker,
            max_failures=t.max_failures,
            s3=s3,
        )
        result = trainer.fit()
        index_group = group_summary(group)
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
