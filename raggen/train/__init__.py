"""End-to-end RAG training on Ray Train.

``trainer`` builds the ``TorchTrainer`` run (``raggen.app.training`` turns a config into its input); ``loop.train_func`` is what each worker
runs; ``step`` holds one training step per estimator; ``checkpointing``, ``metrics`` and
``evaluate`` are the run's outputs and their scores. Importing this package does not import Ray.

Names load on first use (PEP 562): the Train controller unpickles a ``TrainJob`` and needs
``raggen.train.job`` alone, not torch and the step code (seconds of start-up per process).
"""

from __future__ import annotations

from raggen.lazy import lazy_exports

_HOMES = {
    "BatchSchedule": "batches",
    "TrainingState": "checkpointing",
    "export_checkpoint": "checkpointing",
    "read_checkpoint": "checkpointing",
    "write_checkpoint": "checkpointing",
    "evaluate_rag": "evaluate",
    "generate_answers": "evaluate",
    "IndexTarget": "job",
    "TrainJob": "job",
    "train_func": "loop",
    "MetricsWriter": "metrics",
    "plot_metrics": "metrics",
    "read_metrics": "metrics",
    "exact_match": "qa_scores",
    "f1_score": "qa_scores",
    "has_answer": "qa_scores",
    "normalize_answer": "qa_scores",
    "recall_at_k": "qa_scores",
    "GumbelSettings": "settings",
    "JSASettings": "settings",
    "LoopSettings": "settings",
    "StepSettings": "settings",
    "Batch": "step",
    "StepModels": "step",
    "StepOutput": "step",
    "run_step": "step",
    "trainable_roles": "step",
    "make_trainer": "trainer",
}

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)

__all__ = [
    "Batch", "BatchSchedule", "GumbelSettings", "IndexTarget", "JSASettings", "LoopSettings", "MetricsWriter", "StepModels", "StepOutput", "StepSettings",
    "TrainJob", "TrainingState", "evaluate_rag", "export_checkpoint", "exact_match",
    "f1_score", "generate_answers", "has_answer", "make_trainer", "normalize_answer", "plot_metrics",
    "read_checkpoint", "read_metrics", "recall_at_k", "run_step", "train_func",
    "trainable_roles", "write_checkpoint",
]  # fmt: skip
