"""The per-worker training function that Ray Train runs: ``train_func(config)``.

One readable loop (nanoGPT style): build models -> restore the latest checkpoint if Ray hands one
back -> wrap the trained models in DDP -> for each step: a batch from this worker's share of the
QA rows (``batches.rank_share`` of the list the driver put in the object store once), the
estimator's step (``raggen.train.step``), backward, clip, optimizer step -> metrics
(averaged over workers; on rank 0: JSONL + optional TensorBoard/MLflow sinks, a progress line every
``log_every`` steps) -> every ``checkpoint_every`` steps a checkpoint (models, optimizer, the JSA
chain cache of *all* workers, the step, the resolved config) via ``ray.train.report``, after which
rank 0 uploads its local run files (``sinks.RunUpload``); with a trained passage encoder, every
``refresh.every`` steps a re-encoded index (``refresh.py``). Each step's learning rates follow
``schedule.lr_multiplier`` of the global step, so a resumed run continues the same schedule.

``config`` carries one typed ``TrainJob`` (``raggen.app.training.train_job`` builds it from the
YAML config); this module never imports ``raggen.config``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raggen.errors import ConfigError
from raggen.models.build import build_models, use_index_prompts
from raggen.objectives import JSAChainCache
from raggen.train.batches import BatchSchedule, example_rows, rank_share
from raggen.train.checkpointing import TrainingState, restore_state, write_checkpoint
from raggen.train.distributed import average_metrics, cache_digest, gather_cache_state, unwrap
from raggen.train.job import FailureInjection, IndexTarget, TrainJob
from raggen.train.metrics import METRICS_FILE, MetricsWriter
from raggen.train.optim import apply_lr_schedule, make_optimizer
from raggen.train.progress import ProgressLog, ensure_log_handler
from raggen.train.refresh import RefreshSpec, agree_on_version, build_refreshed_index, refresh_due
from raggen.train.searched_index import load_index, searched_index
from raggen.train.settings import LoopSettings, StepSettings
from raggen.train.sinks import RunUpload, open_sinks
from raggen.train.step import Batch, StepModels, run_step, trainable_roles

log = logging.getLogger(__name__)


def _autocast(device: torch.device):
    from raggen.devices import pick_dtype

    if device.type == "cuda" and pick_dtype(device) == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


@dataclass
class Worker:
    """Everything one worker trains with (kept together so the loop body stays short)."""

    job: TrainJob
    models: dict[str, nn.Module]  # bare modules
    wrapped: dict[str, nn.Module]  # DDP-wrapped where trained with world_size > 1
    roles: tuple[str, ...]
    optimizer: torch.optim.Optimizer
    cache: JSAChainCache
    index: Any
    target: IndexTarget  # what ``index`` was opened from (a checkpoint records a refreshed one)
    device: torch.device
    rank: int
    world_size: int

    @property
    def settings(self) -> LoopSettings:
        return self.job.loop

    @property
    def step_cfg(self) -> StepSettings:
        return self.job.step

    def step_models(self) -> StepModels:
        w, m = self.wrapped, self.models
        return StepModels(
            query_encoder=w["query_encoder"],
            query_encoder_raw=m["query_encoder"],
            generator=w["generator"],
            generator_raw=m["generator"],
            posterior=w.get("posterior_encoder"),
            reranker=w.get("reranker"),
            passage_encoder=w.get("passage_encoder"),
        )

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def train_mode(self, on: bool) -> None:
        for role, model in self.models.items():
            model.train(on and role in self.roles)


def _no_buffer_sync_per_forward() -> dict[str, bool]:
    """DDP's switch for not re-broadcasting buffers before every forward (our buffers, position ids,
    never change): ``forward_sync_buffers`` where torch has it (2.13 deprecates ``broadcast_buffers``
    with a warning per worker), else the old name."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def setup_worker(
    job: TrainJob, rank: int, world_size: int, device: torch.device, state: TrainingState | None
) -> Worker:
    settings, step_cfg = job.loop, job.step
    torch.manual_seed(settings.seed + rank)
    train_d = job.passage_encoder is not None
    try:
        roles = trainable_roles(step_cfg.estimator, step_cfg.trains_generator, train_d)
    except ValueError as e:
        raise ConfigError(f"train.train_passage_encoder: {e}") from None
    models = build_models(job.models, step_cfg.estimator, state.model_dirs if state else None, job.passage_encoder)
    for role, model in models.items():
        model.requires_grad_(role in roles)
        model.to(device)
    wrapped = dict(models)
    if world_size > 1:
        from ray.train.torch import prepare_model

        ddp_kwargs = {"find_unused_parameters": True, **_no_buffer_sync_per_forward()}
        for role in roles:
            wrapped[role] = prepare_model(models[role], move_to_device=device, parallel_strategy_kwargs=ddp_kwargs)
    optimizer = make_optimizer(models, roles, settings)
    if state is not None and state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
    cache = JSAChainCache(restart_chains=step_cfg.jsa.restart_chains)
    if state is not None and state.jsa_cache_state is not None:
        cache.load_state_dict(state.jsa_cache_state)
    target = searched_index(job, state)
    index = load_index(target, rank, world_size)
    query = job.models.query_encoder
    conflict = index.manifest.encoder.pooling_conflict(query.name_or_path, query.pooling)
    if conflict:
        raise ConfigError(f"model.query_encoder.pooling: {target.uri}: {conflict}")
    use_index_prompts(models, index.manifest.encoder.query_prefix)
    return Worker(job, models, wrapped, roles, optimizer, cache, index, target, device, rank, world_size)


def train_step(worker: Worker, batch: Batch, step: int) -> dict[str, float]:
    """One optimisation step; returns this worker's scalar metrics (not yet averaged)."""
    rng = torch.Generator(device=worker.device)
    rng.manual_seed(_step_seed(worker.settings.seed, worker.rank, step))
    worker.train_mode(True)
    with _autocast(worker.device):
        out = run_step(worker.step_models(), worker.index, batch, worker.step_cfg, cache=worker.cache, rng=rng)
    worker.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(worker.params(), worker.settings.grad_clip)
    scale = apply_lr_schedule(worker.optimizer, worker.settings, step)
    worker.optimizer.step()
    # lr: train.lr under the schedule (the reader's rate; retrievers' is retriever_lr times lr_scale)
    metrics = {
        "loss": float(out.loss.detach()),
        "grad_norm": float(grad_norm),
        "lr": worker.settings.lr * scale,
        "lr_scale": scale,
    }
    metrics.update({k: float(v) for k, v in out.diagnostics.items()})
    return metrics


def save_checkpoint(
    worker: Worker, directory: str, step: int, epoch: int, cache_state: dict | None, metrics_path: str | None
) -> None:
    """Rank 0 writes the checkpoint folder: trained models, optimizer, merged JSA cache, step."""
    models = {role: unwrap(worker.models[role]) for role in worker.roles}
    extra: dict[str, Any] = {"estimator": worker.step_cfg.estimator, "world_size": worker.world_size}
    if worker.target.refreshed:  # else a resume opens the configured index (its LATEST)
        extra["index"] = {"uri": worker.target.uri, "version": worker.index.version, "refreshed": True}
    write_checkpoint(
        directory,
        models=models,
        step=step,
        epoch=epoch,
        optimizer=worker.optimizer,
        jsa_cache_state=cache_state,
        extra=extra,
        config_yaml=worker.job.config_yaml,
    )
    if metrics_path and os.path.exists(metrics_path):
        shutil.copyfile(metrics_path, os.path.join(directory, METRICS_FILE))


def maybe_inject_failure(spec: FailureInjection | None, rank: int, step: int) -> None:
    """Test hook: kills worker ``spec.rank`` once before step ``spec.step`` (the marker file records
    that it happened, so the restarted worker carries on)."""
    if spec is None or rank != spec.rank or step != spec.step:
        return
    marker = Path(spec.marker)
    if marker.exists():
        return
    import ray.train

    # Die only once the controller has committed the reports so far: a crash right after a report
    # could otherwise beat the checkpoint's registration, and the test would restart from scratch.
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed at step {step}\n")
    log.warning("inject_failure: rank %d exits at step %d", rank, step)
    os._exit(1)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point (see the module docstring); ``config`` holds the ``TrainJob``."""
    t_enter = time.time()
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    job = TrainJob.from_loop_config(config)
    settings = job.loop
    if job.num_threads:
        torch.set_num_threads(job.num_threads)
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    state, stack = restore_state()
    with stack:
        worker = setup_worker(job, rank, world_size, device, state)
    start = state.step if state else 0
    sinks, upload, progress = [], None, None
    if rank == 0:  # rank 0 alone logs progress, feeds the sinks and uploads the run files
        ensure_log_handler()
        sinks = open_sinks(job.sinks, start, job.config_yaml)
        upload = RunUpload.from_job(job.metrics_path, job.run_uri, job.run_s3)
        progress = ProgressLog(settings.steps, settings.log_every, settings.batch_size * world_size, start)
    writer = MetricsWriter(job.metrics_path, enabled=rank == 0, fresh=state is None, sinks=sinks)
    if state is not None:
        writer.write(
            {
                "event": "restored",
                "step": start,
                "jsa_cache_entries": len(worker.cache),
                "jsa_cache_digest": cache_digest(worker.cache.state_dict()),
                "time": time.time(),
            }
        )
    t_setup = time.time()
    if job.train_rows is None:
        raise ConfigError("TrainJob.train_rows: no QA rows (make_trainer puts them in the object store)")
    rows = rank_share(ray.get(job.train_rows), rank, world_size)
    schedule = BatchSchedule(example_rows(rows), settings.batch_size, settings.seed * 31 + rank)
    dev = _dev_examples(job) if rank == 0 and settings.eval_every else None
    refresh = job.refresh if "passage_encoder" in worker.roles else None  # refresh_due skips every = 0
    writer.write(
        {
            "event": "started",
            "step": start,
            "world_size": world_size,
            "examples": len(schedule.examples),
            "index_uri": worker.target.uri,
            "index_version": worker.index.version,
            "setup_s": t_setup - t_enter,
            "data_s": time.time() - t_setup,
            "time": time.time(),
        }
    )
    t_last = time.perf_counter()
    try:
        for step in range(start, settings.steps):
            maybe_inject_failure(job.inject_failure, rank, step + 1)
            t0, cpu0 = time.perf_counter(), time.process_time()
            local = train_step(worker, schedule.batch(step), step)
            elapsed = time.perf_counter() - t0
            local["step_cpu_s"] = time.process_time() - cpu0  # this process's CPU time (all its threads)
            metrics = average_metrics(local, device)
            done, wall, t_last = step + 1, time.perf_counter() - t_last, time.perf_counter()
            # step_time_s: the step's compute; examples_per_s: over the wall time since the last step
            # ended (reports, checkpoints and evaluation included)
            metrics.update(
                step=done,
                epoch=schedule.epoch_of(step),
                step_time_s=elapsed,
                examples_per_s=settings.batch_size * world_size / max(wall, 1e-9),
            )
            if refresh is not None and refresh_due(done, refresh.every, settings.steps):
                metrics.update(_refresh(worker, refresh, done, writer))
            if dev is not None and done % settings.eval_every == 0:
                metrics.update(_evaluate(worker, dev, done, writer))
            writer.write({**metrics, "time": time.time()})
            if progress is not None:
                progress.update(done, metrics)
            if _report(worker, metrics, done, schedule.epoch_of(step), final=done == settings.steps):
                _sync_run_files(writer, upload)
    finally:
        writer.close()
        _sync_run_files(writer, upload)  # also after a failure: what was logged so far


def _sync_run_files(writer: MetricsWriter, upload: RunUpload | None) -> None:
    """Flush the sinks, then copy rank 0's run files to storage (a failure is only a warning)."""
    if upload is not None:
        writer.flush()
        upload.try_upload()


def _report(worker: Worker, metrics: dict[str, float], step: int, epoch: int, final: bool) -> bool:
    """``ray.train.report`` with a checkpoint every ``checkpoint_every`` steps and at the end, and
    without one every ``report_every`` steps (0: never). Every worker calls it (it is collective).
    True on the worker that wrote a checkpoint (rank 0)."""
    import ray.train

    every = worker.settings.report_every
    want_checkpoint = final or step % worker.settings.checkpoint_every == 0
    if not want_checkpoint and (not every or step % every):
        return False
    if not want_checkpoint:
        ray.train.report(metrics)
        return False
    cache_state = gather_cache_state(worker.cache) if worker.step_cfg.estimator == "jsa" else None
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return False
    with tempfile.TemporaryDirectory(prefix="raggen-ckpt-") as tmp:
        save_checkpoint(worker, tmp, step, epoch, cache_state, worker.job.metrics_path)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    return True


def _dev_examples(job: TrainJob) -> list[Any] | None:
    """The dev file (local or ``s3://``, with the run's S3 settings) without the questions the run
    trains on (``dev_exclude_ids``, found on the driver), cut to ``eval_examples``."""
    if not job.dev_file:
        return None
    from raggen.corpus.qa import read_qa

    excluded = set(job.dev_exclude_ids)
    examples = read_qa(job.dev_file, s3_options=job.index.s3)
    return [ex for ex in examples if ex.id not in excluded][: job.loop.eval_examples]


def _evaluate(worker: Worker, dev: list[Any], step: int, writer: MetricsWriter) -> dict[str, float]:
    """Rank 0 scores the dev subset with the current models (the other workers wait at the next
    all-reduce); the numbers go to the JSONL as an ``eval`` event and into the report."""
    from raggen.train.evaluate import evaluate_rag

    worker.train_mode(False)
    cfg = worker.step_cfg
    gumbel = cfg.estimator == "gumbel-rerank"
    with torch.no_grad(), _autocast(worker.device):
        scores = evaluate_rag(
            dev,
            query_encoder=worker.models["query_encoder"],
            generator=worker.models["generator"],
            index=worker.index,
            top_k=cfg.retrieved_k,
            decoding=worker.job.eval_decoding,
            reranker=worker.models.get("reranker"),
            rerank_candidates=cfg.gumbel.candidates if gumbel else None,
        )
    out = {f"eval_{k}": float(v) for k, v in scores.items()}
    writer.write({"event": "eval", "step": step, **out, "time": time.time()})
    return out


def _refresh(worker: Worker, spec: RefreshSpec, step: int, writer: MetricsWriter) -> dict[str, float]:
    """Re-encode the corpus with the current passage encoder and search the new index from the next
    step on (all workers; rank 0 builds). The old index is closed only once the new one is open."""
    t0 = time.perf_counter()
    encoder = unwrap(worker.models["passage_encoder"])
    version = agree_on_version(lambda: build_refreshed_index(encoder, spec, step), worker.rank)
    target = worker.target.replace(uri=spec.output_uri, version=version, s3=spec.s3, refreshed=True)
    new_index = load_index(target, worker.rank, worker.world_size)
    old, worker.index, worker.target = worker.index, new_index, target
    # every rank has switched (load_index is a collective): rank 0 also ends an old actor group
    # that the driver started, which nobody searches any more
    old.close(release_shared=worker.rank == 0)
    seconds = time.perf_counter() - t0
    writer.write(
        {
            "event": "index_refresh",
            "step": step,
            "version": version,
            "uri": spec.output_uri,
            "seconds": seconds,
            "time": time.time(),
        }
    )
    log.info("index refresh at step %d: %s/%s in %.1f s", step, spec.output_uri, version, seconds)
    return {"index_refresh_s": seconds}
