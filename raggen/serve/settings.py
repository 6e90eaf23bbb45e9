"""Serve deployment settings (resources, autoscaling) that the raggen config's ``serve`` section
embeds and ``build_app``'s args validate: declared once, here, beside the code that uses them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raggen.serve.auth import DEFAULT_TOKEN_ENV


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a YAML file must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingSection(_Strict):
    """Ray Serve's ``autoscaling_config`` (the same names; Ray's defaults for the delays)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class AutoscalingOverride(_Strict):
    """Some fields of :class:`AutoscalingSection` for one deployment; unset ones keep the shared value."""

    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)
    upscale_delay_s: float | None = Field(None, ge=0)
    downscale_delay_s: float | None = Field(None, ge=0)
    look_back_period_s: float | None = Field(None, gt=0)


class DeploymentSection(_Strict):
    """One Serve deployment's resources and autoscaling; every unset field keeps the shared default
    (``replica_num_cpus``, ``replica_num_gpus``, ``replica_memory_gb``, ``autoscaling``; the Ingress:
    ``ingress_num_cpus``, no GPU, no memory reservation)."""

    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    memory_gb: float | None = Field(None, gt=0)  # Ray's ``memory`` resource: a reservation for scheduling
    autoscaling: AutoscalingOverride | None = None

    def resolve_autoscaling(self, shared: AutoscalingSection) -> AutoscalingSection:
        """``shared`` with this deployment's fields on top (validated: min_replicas <= max_replicas)."""
        own = self.autoscaling.model_dump(exclude_none=True) if self.autoscaling is not None else {}
        return AutoscalingSection(**{**shared.model_dump(), **own})


class ServeDeploymentsSection(_Strict):
    """Per-deployment overrides of the shared serve resources: ``serve.deployments.generator.num_gpus``."""

    retriever: DeploymentSection = DeploymentSection()
    reranker: DeploymentSection = DeploymentSection()
    generator: DeploymentSection = DeploymentSection()
    ingress: DeploymentSection = DeploymentSection()

    def check_against(self, shared: AutoscalingSection) -> None:
        """Raise ValueError naming the deployment whose merged autoscaling is inconsistent."""
        for name in type(self).model_fields:
            try:
                getattr(self, name).resolve_autoscaling(shared)
            except ValidationError as exc:
                raise ValueError(f"deployments.{name}.autoscaling: {exc.errors()[0]['msg']}") from None


class ServingSettings(_Strict):
    """What the raggen config's ``serve`` section and ``build_app``'s args share, declared once:
    both classes inherit these fields (one name, one default, one description, one validation)."""

    watch_latest: bool = Field(False, description="follow the index root's LATEST pointer (hot-swap on change)")
    watch_interval_s: float = Field(10.0, gt=0, description="how often the watcher reads LATEST")
    default_top_k: int = Field(5, ge=1, description="passages per question when a request names none")
    max_top_k: int = Field(20, ge=1, description="the most passages a request may ask for")
    max_question_chars: int = Field(1000, ge=1, description="longer questions get 422")
    max_new_tokens: int = Field(32, ge=1, description="the most answer tokens a request may ask for")
    num_beams: int = Field(4, ge=1, description="beam width of RAG-Token / RAG-Sequence decoding")
    # shared defaults of the model deployments; `deployments` overrides them per deployment, field by field
    replica_num_cpus: float = Field(0.25, gt=0, description="CPUs of each Retriever/Reranker/Generator replica")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs of each model replica")
    replica_memory_gb: float | None = Field(None, gt=0, description="Ray memory reservation of each model replica")
    ingress_num_cpus: float = Field(0.1, gt=0, description="CPUs of each Ingress replica (it only awaits the others)")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch size of the model deployments")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    max_ongoing_requests: int | None = Field(None, ge=1, description="per replica; default: 2 x max_batch_size (>= 5)")
    autoscaling: AutoscalingSection = AutoscalingSection()
    deployments: ServeDeploymentsSection = ServeDeploymentsSection()
    api_token_env: str = Field(DEFAULT_TOKEN_ENV, description="the environment variable holding the bearer token")
    # faults: see raggen.serve.resilience
    allow_unauthenticated: bool = Field(False, description="serve on a non-loopback host without a token")
    retry_attempts: int = Field(3, ge=1, le=10, description="tries of a model call whose replica died")
    retry_backoff_s: float = Field(0.1, ge=0, le=10, description="wait before the 2nd try; doubles after")
    max_queued_requests: int = Field(64, ge=1, description="requests a deployment's callers may queue; more: 503")
    retry_after_s: float = Field(1.0, ge=0, le=3600, description="the Retry-After of a 503")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="request bodies over this get 413")
    drain_poll_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="how often a stopping replica checks that its requests are done (Serve's "
        "graceful_shutdown_wait_loop_s, 2 s by default: every scale-down, redeploy and shutdown waits one)",
    )

    @model_validator(mode="after")
    def _serving_consistent(self) -> ServingSettings:
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k ({self.default_top_k}) must be <= max_top_k ({self.max_top_k})")
        self.deployments.check_against(self.autoscaling)
        return self

    def serving_args(self) -> dict:
        """These fields as plain ``build_app`` args (unset per-deployment overrides left out)."""
        out = self.model_dump(include=set(ServingSettings.model_fields))
        out["deployments"] = self.deployments.model_dump(exclude_none=True)
        return out
