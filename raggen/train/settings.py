"""Training settings, declared once: the config's ``train`` section *is* these classes (it inherits
them), so a field is typed, defaulted, documented and validated here and nowhere else, and the
driver hands the validated objects to every Ray Train worker (no dict in between)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raggen.names import EstimatorName


class _Frozen(BaseModel):
    """Unknown keys are errors (a YAML typo must not fall back to a default); values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class JSASettings(_Frozen):
    """JSA-RAG's sampler. The defaults keep the exact estimator; the official JSA-RAG code used
    temperature 0.1 and 50 proposals."""

    num_proposals: int = Field(8, ge=1, description="Metropolis independence sampler steps per example")
    retriever_temperature: float = Field(
        1.0, gt=0, description="p(z|x) and q(z|x,y) are softmax(scores / T); VRAG uses it too, so both compare at one T"
    )
    length_normalize: bool = Field(False, description="score a target by its mean token log-prob instead of the sum")
    restart_chains: bool = Field(False, description="start each epoch's chains afresh instead of from the cache")


class GumbelSettings(_Frozen):
    """Gumbel reranking: a relaxed top-k mask over ``candidates`` retrieved passages."""

    k: int = Field(2, ge=1, description="passages the relaxed mask keeps")
    tau: float = Field(0.5, gt=0, description="Gumbel-softmax temperature")
    method: Literal["subset", "max"] = Field("subset", description="relaxed subset sampling or k independent maxima")
    train_reader: bool = Field(False, description="also train the generator (the reranker always trains)")
    candidates: int = Field(10, ge=1, description="passages retrieved for the reranker to choose from")


class StepSettings(_Frozen):
    """What one estimator step needs (``raggen.train.step.run_step``)."""

    estimator: EstimatorName = Field("jsa", description="the training objective (raggen.names.ESTIMATORS)")
    top_k: int = Field(5, ge=1, le=100, description="passages retrieved per question")
    train_generator: bool = Field(True, description="train the generator (gumbel-rerank: gumbel.train_reader)")
    vrag_beta: float = Field(1.0, ge=0, description="VRAG: weight of the KL term of the ELBO")
    pdist_temperature: float = Field(1.0, gt=0, description="EMDR2/PDist: temperature of the reader's distribution")
    jsa: JSASettings = JSASettings()
    gumbel: GumbelSettings = GumbelSettings()

    @model_validator(mode="after")
    def _gumbel_k_fits(self) -> StepSettings:
        if self.estimator == "gumbel-rerank" and self.gumbel.k > self.gumbel.candidates:
            raise ValueError("gumbel.k must not exceed gumbel.candidates")
        return self

    @property
    def trains_generator(self) -> bool:
        """Whether the generator gets gradients: gumbel-rerank has its own switch."""
        return self.gumbel.train_reader if self.estimator == "gumbel-rerank" else self.train_generator

    @property
    def retrieved_k(self) -> int:
        """How many passages the reader sees at evaluation: gumbel-rerank keeps ``gumbel.k``."""
        return self.gumbel.k if self.estimator == "gumbel-rerank" else self.top_k


class LoopSettings(_Frozen):
    """The optimisation loop's schedule (``raggen.train.loop``)."""

    steps: int = Field(200, ge=1, description="optimizer steps in the whole run (a resumed run continues to it)")
    batch_size: int = Field(8, ge=1, description="examples per worker per step")
    lr: float = Field(3e-5, gt=0, description="peak learning rate of the generator (and of retrievers, by default)")
    retriever_lr: float | None = Field(None, gt=0, description="peak rate of the retrievers when set")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to the peak rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after warm-up; a function of the global step, so a resume continues it"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    seed: int = Field(0, description="batches, sampler and initial weights are functions of it")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (and the last step)")
    eval_every: int = Field(0, ge=0, description="steps between dev evaluations on rank 0 (0: none)")
    eval_examples: int = Field(200, ge=1, description="dev questions scored per evaluation")
    log_every: int = Field(10, ge=0, description="steps between rank 0's progress lines (0: none)")
    report_every: int = Field(
        0, ge=0, description="also ray.train.report without a checkpoint every N steps (a barrier; 0: never)"
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> LoopSettings:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        return self
