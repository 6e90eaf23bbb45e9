"""End-to-end RAG training on Ray Train.

``trainer`` builds the ``TorchTrainer`` run (``raggen.app.training`` turns a config into its input); ``loop.train_func`` is what each worker
runs; ``step`` holds one training step per estimator; ``checkpointing``, ``metrics`` and
``evaluate`` are the run's outputs and their scores. Importing this package does not import Ray.
"""

from raggen.models.build import build_models
from raggen.train.batches import BatchSchedule
from raggen.train.checkpointing import TrainingState, export_checkpoint, read_checkpoint, write_checkpoint
from raggen.train.evaluate import evaluate_rag, generate_answers
from raggen.train.job import IndexTarget, TrainJob
from raggen.train.loop import train_func
from raggen.train.metrics import MetricsWriter, plot_metrics, read_metrics
from raggen.train.qa_scores import exact_match, f1_score, has_answer, normalize_answer, recall_at_k
from raggen.train.settings import GumbelSettings, JSASettings, LoopSettings, StepSettings
from raggen.train.step import Batch, StepModels, StepOutput, run_step, trainable_roles
from raggen.train.trainer import make_trainer

__all__ = [
    "Batch", "BatchSchedule", "GumbelSettings", "IndexTarget", "JSASettings", "LoopSettings", "MetricsWriter", "StepModels", "StepOutput", "StepSettings",
    "TrainJob", "TrainingState", "build_models", "evaluate_rag", "export_checkpoint", "exact_match",
    "f1_score", "generate_answers", "has_answer", "make_trainer", "normalize_answer", "plot_metrics",
    "read_checkpoint", "read_metrics", "recall_at_k", "run_step", "train_func",
    "trainable_roles", "write_checkpoint",
]  # fmt: skip
