"""The per-worker training function that Ray Train runs: ``train_func(config)``.

One readable loop (nanoGPT style): build models -> restore the latest checkpoint if Ray hands one
back -> wrap the trained models in DDP -> for each step: a batch from this worker's dataset
shard, the estimator's step (``raggen.train.step``), backward, clip, optimizer step -> metrics
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
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raggen.errors import ConfigError
from raggen.models.build import build_models
from raggen.objectives import JSAChainCache
from raggen.train.checkpointing import TrainingState, read_checkpoint, write_checkpoint
from raggen.train.job import FailureInjection, IndexTarget, TrainJob
from raggen.train.metrics import METRICS_FILE, MetricsWriter
from raggen.train.progress import ProgressLog, ensure_log_handler
from raggen.train.refresh import RefreshSpec, agree_on_version, build_refreshed_index, refresh_due
from raggen.train.schedule import lr_multiplier
from raggen.train.settings import LoopSettings, StepSettings
from raggen.train.sinks import RunUpload, open_sinks
from raggen.train.step import Batch, StepModels, run_step, trainable_roles

log = logging.getLogger(__name__)

RETRIEVER_ROLES = ("query_encoder", "posterior_encoder", "passage_encoder")


# ---------------------------------------------------------------------------------------------
# Models, optimizer, index
# ---------------------------------------------------------------------------------------------


def role_lr(role: str, settings: LoopSettings) -> float:
    """The configured (peak) rate of a model: retrievers use ``retriever_lr`` when set."""
    return settings.retriever_lr if role in RETRIEVER_ROLES and settings.retriever_lr else settings.lr


def make_optimizer(
    models: dict[str, nn.Module], roles: tuple[str, ...], settings: LoopSettings
) -> torch.optim.Optimizer:
    """AdamW with one param group per trained model, in ``roles`` order (stable across restarts,
    so a saved optimizer state lines up), each at ``role_lr``."""
    groups = []
    for role in roles:
        params = [p for p in models[role].parameters() if p.requires_grad]
        groups.append({"params": params, "lr": role_lr(role, settings), "name": role})
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def apply_lr_schedule(optimizer: torch.optim.Optimizer, settings: LoopSettings, step: int) -> float:
    """Set every group's rate for ``step`` (0-based global step) from the settings, never from the
    restored optimizer state (a resume may change ``train.lr``); returns the multiplier."""
    scale = lr_multiplier(step, settings.steps, settings.warmup_steps, settings.lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = role_lr(group["name"], settings) * scale
    return scale


def load_index(target: IndexTarget, rank: int = 0, world_size: int = 1):
    """The published index the loop searches (every checksum verified on load), opened with the
    ``index.search`` settings:

    * through the shard-actor group the driver started for this index (``target.group``, shared by
      every worker: one group, not one copy per worker);
    * else, when the settings ask for actors (a refreshed version, a resumed run), rank 0 starts a
      group and hands it to the other ranks (a collective: every rank calls this at the same point);
    * else in this process (small indexes).
    Stored vectors for the hits come back from wherever the shards live."""
    from raggen.index import ShardActorGroup, open_index
    from raggen.index.open_search import search_plan

    settings, s3, group = target.search, target.s3, target.group
    if group is not None and group.source_uri == target.uri and target.version in (None, group.version):
        return open_index(target.uri, group=group)

    def plan():
        vuri, manifest, actors = search_plan(target.uri, target.version, settings, s3)
        return ShardActorGroup.start(vuri, settings=settings, s3_options=s3, manifest=manifest) if actors else vuri

    where = _from_rank_zero(plan, rank, world_size)
    if isinstance(where, ShardActorGroup):
        return where.sharded_index(owned=rank == 0)
    return open_index(where, settings=settings.model_copy(update={"mode": "local"}), s3_options=s3)


def _from_rank_zero(fn, rank: int, world_size: int):
    """``fn()`` on rank 0, its result (pickled) on every rank; an error there raises everywhere."""
    import torch.distributed as dist

    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    if not distributed:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status != "ok":
        raise RuntimeError(f"opening the index failed on rank 0: {value}")
    return value


def searched_index(job: TrainJob, state: TrainingState | None) -> IndexTarget:
    """The index to open: the refreshed version a checkpoint recorded, else the configured one."""
    recorded = (state.extra.get("index") if state is not None else None) or {}
    if not recorded:
        return job.index
    return job.index.replace(
        uri=recorded["uri"], version=recorded.get("version"), refreshed=bool(recorded.get("refreshed"))
    )


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def example_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows from Ray Data (answers/gold ids JSON-encoded, so ragged lists stay one column) sorted by
    id: the order the batch schedule permutes does not depend on how Ray Data split the data."""
    out = []
    for r in rows:
        answers = json.loads(r["answers"]) if isinstance(r["answers"], str) else list(r["answers"])
        out.append({"id": str(r["id"]), "question": str(r["question"]), "answers": answers})
    if not out:
        raise ConfigError("train.train_file: this worker's dataset shard is empty (fewer examples than workers?)")
    return sorted(out, key=lambda r: r["id"])


class BatchSchedule:
    """Batch ``step`` is a pure function of (examples, seed, step): epochs are seeded permutations,
    so a restored run sees exactly the batches the lost one would have seen."""

    def __init__(self, examples: list[dict[str, Any]], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # a batch spans <= 2 epochs
            self._perms[epoch] = order
        return self._perms[epoch]

    def epoch_of(self, step: int) -> int:
        return step * self.batch_size // len(self.examples)

    def batch(self, step: int) -> Batch:
        n = len(self.examples)
        rows = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            rows.append(self.examples[self._perm(pos // n)[pos % n]])
        return Batch.from_rows(rows)


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def average_metrics(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar over workers (one all-reduce); keys must agree across workers."""
    if not _dist() or torch.distributed.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_cache_state(cache: JSAChainCache) -> dict[str, Any]:
    """Every worker's chain states merged (the shards hold disjoint example ids)."""
    state = cache.state_dict()
    if not _dist() or torch.distributed.get_world_size() == 1:
        return state
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, state["states"])
    merged: dict[Any, Any] = {}
    for part in parts:
        merged.update(part)
    return {**state, "states": merged}


def cache_digest(state: dict[str, Any] | None) -> str:
    """A fingerprint of a JSA cache state (tests compare a restored cache with the saved one)."""
    items = sorted((str(k), str(v)) for k, v in ((state or {}).get("states") or {}).items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _autocast(device: torch.device):
    from raggen.devices import pick_dtype

    if device.type == "cuda" and pick_dtype(device) == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


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

        ddp_kwargs = {"find_unused_parameters": True, "broadcast_buffers": False}
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


def restore_state() -> tuple[TrainingState | None, contextlib.ExitStack]:
    """The latest checkpoint Ray hands back (resume after a failure or a rerun of the same name).

    The checkpoint folder stays available until the returned stack closes (after models load).
    """
    import ray.train

    stack = contextlib.ExitStack()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, stack
    directory = stack.enter_context(_checkpoint_directory(checkpoint))
    return read_checkpoint(directory), stack


@contextlib.contextmanager
def _checkpoint_directory(checkpoint) -> Iterator[str]:
    """A local folder holding the checkpoint. A remote (S3) one is downloaded into this worker's own
    temporary folder: ``Checkpoint.as_directory()`` shares one folder among a node's workers, and a
    worker that takes the download lock after another finished downloads again over the files the
    first is reading (seen as a corrupt optimizer.pt on resume)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    tmp = tempfile.mkdtemp(prefix="raggen-restore-")
    try:
        yield checkpoint.to_directory(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point (see the module docstring); ``config`` holds the ``TrainJob``."""
    t_enter = time.time()
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
    shard = ray.train.get_dataset_shard("train")
    schedule = BatchSchedule(example_rows(list(shard.iter_rows())), settings.batch_size, settings.seed * 31 + rank)
    dev = _dev_examples(job) if rank == 0 and settings.eval_every else None
    refresh = job.refresh if "passage_encoder" in worker.roles and job.refresh and job.refresh.every > 0 else None
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

    every = worker.job.report_every
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
