"""What the driver hands every Ray Train worker: one frozen, typed ``TrainJob`` (the validated
settings objects themselves, not a dict of their values), built by ``raggen.app.training``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raggen.index.settings import SearchSettings
from raggen.models.specs import ModelSpec, PassageEncoderSpec
from raggen.train.refresh import RefreshSpec
from raggen.train.settings import LoopSettings, StepSettings

JOB_KEY = "job"  # Ray Train's train_loop_config is a dict: the job travels under this one key


@dataclass(frozen=True)
class IndexTarget:
    """The published index a run searches, and how (``index.search``). ``group`` is the shard-actor
    group the driver started for it (shared by every worker); ``refreshed`` marks a version the run
    built itself (a checkpoint records it, so a resume searches it again)."""

    uri: str
    search: SearchSettings = SearchSettings()
    version: str | None = None
    s3: dict[str, Any] | None = None
    group: Any = None
    refreshed: bool = False

    def replace(self, **changes: Any) -> IndexTarget:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FailureInjection:
    """Test hook: worker ``rank`` exits once before step ``step``; ``marker`` records that it did."""

    rank: int
    step: int
    marker: str


@dataclass(frozen=True)
class TrainJob:
    """Everything ``raggen.train.loop.train_func`` reads."""

    loop: LoopSettings
    step: StepSettings
    models: ModelSpec
    index: IndexTarget
    run_uri: str | None = None  # where rank 0 uploads its run files (None: nowhere)
    run_s3: dict[str, Any] | None = None
    config_yaml: str | None = None  # the resolved RaggenConfig, saved in every checkpoint
    metrics_path: str | None = None  # rank 0's local metrics.jsonl
    passage_encoder: PassageEncoderSpec | None = None  # set: d(z) is trained
    refresh: RefreshSpec | None = None
    sinks: dict[str, Any] = field(default_factory=dict)  # ``raggen.train.sinks.open_sinks`` input
    dev_file: str | None = None
    dev_exclude_ids: tuple[str, ...] = ()  # dev questions that are also training questions: not scored
    use_gpu: bool = False
    num_threads: int | None = None  # torch intra-op threads per worker (Ray sets OMP_NUM_THREADS)
    eval_decoding: str = "rag-token"
    inject_failure: FailureInjection | None = None
    # the QA rows (``trainer.qa_items``) as one object-store ref the driver puts once; every worker
    # takes its ``batches.rank_share`` (a few MB even for NQ's 79k questions: no Ray Dataset, whose
    # split costs two more actors per run, needed for a list the driver already holds)
    train_rows: Any = None

    def replace(self, **changes: Any) -> TrainJob:
        return dataclasses.replace(self, **changes)

    def as_loop_config(self) -> dict[str, Any]:
        """Ray Train's ``train_loop_config``."""
        return {JOB_KEY: self}

    @classmethod
    def from_loop_config(cls, config: dict[str, Any]) -> TrainJob:
        job = config.get(JOB_KEY)
        if not isinstance(job, cls):
            raise TypeError(f"train_loop_config[{JOB_KEY!r}] must be a TrainJob, got {type(job).__name__}")
        return job
