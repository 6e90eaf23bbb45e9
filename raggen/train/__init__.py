"""End-to-end RAG training on Ray Train.

``trainer`` turns a config into a ``TorchTrainer`` run; ``loop.train_func`` is what each worker
runs; ``step`` holds one training step per estimator; ``checkpointing``, ``metrics`` and
``evaluate`` are the run's outputs and their scores. Importing this package does not import Ray.
"""

from raggen.train.checkpointing import TrainingState, copy_checkpoint, read_checkpoint, write_checkpoint
from raggen.train.evaluate import (
    evaluate_from_config,
    evaluate_rag,
    exact_match,
    f1_score,
    generate_answers,
    has_answer,
    normalize_answer,
    recall_at_k,
)
from raggen.train.loop import BatchSchedule, LoopSettings, build_models, train_func
from raggen.train.metrics import MetricsWriter, plot_metrics, read_metrics
from raggen.train.step import Batch, StepModels, StepOutput, StepSettings, run_step, trainable_roles
from raggen.train.trainer import make_trainer, run_training, train_loop_config

__all__ = [
    "Batch", "BatchSchedule", "LoopSettings", "MetricsWriter", "StepModels", "StepOutput", "StepSettings",
    "TrainingState", "build_models", "copy_checkpoint", "evaluate_from_config", "evaluate_rag", "exact_match",
    "f1_score", "generate_answers", "has_answer", "make_trainer", "normalize_answer", "plot_metrics",
    "read_checkpoint", "read_metrics", "recall_at_k", "run_step", "run_training", "train_func",
    "train_loop_config", "trainable_roles", "write_checkpoint",
]  # fmt: skip
