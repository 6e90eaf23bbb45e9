"""Build and deploy the serve graph: Ingress -> Retriever -> [Reranker] -> Generator.

Three ways in, one builder:

* a Serve config file (``serve deploy configs/serve.yaml``, a KubeRay RayService) names
  ``import_path: raggen.serve.app:build_app`` and passes ``args`` (:class:`AppArgs`);
* ``raggen serve CONFIG`` calls :func:`serve_from_config`, which turns the raggen config into the
  same Serve config (:func:`serve_deploy_config`) and deploys it;
* Python: ``serve.run(build_app_from_config(index=..., generator=...))``.

The index a running service serves is the Retriever's ``user_config``. Changing only that
(:func:`with_index`, then :func:`deploy_config` or ``serve deploy``) is a lightweight update:
Serve calls ``reconfigure`` on the live replicas, which load and verify the new version beside the
old one and swap. Changing ``args`` instead redeploys every replica.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve import Application

from raggen.errors import ConfigError, RaggenError
from raggen.index.settings import SearchSettings
from raggen.models.specs import EncoderSpec
from raggen.retrieval.settings import RetrievalSettings
from raggen.serve.deployments import Generator, IndexUserConfig, Reranker, Retriever
from raggen.serve.ingress import Ingress
from raggen.serve.schemas import RequestLimits

# one definition for the raggen config and Serve args
from raggen.serve.settings import DeploymentSection, ServingSettings

log = logging.getLogger(__name__)

APP_NAME = "raggen"
IMPORT_PATH = "raggen.serve.app:build_app"
S3_CREDENTIAL_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


class AppArgs(ServingSettings):
    """``args`` of ``build_app``: plain values (a Serve config's YAML, or a raggen config's fields);
    the limits, resources and fault settings are :class:`ServingSettings`' (shared with the config)."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(min_length=1, description="index root (folder or s3:// prefix) with versions + LATEST")
    index_version: str | None = None
    # how the Retriever opens the index: local or shard actors, nprobe / efSearch (raggen.index.settings)
    index_search: SearchSettings = SearchSettings()
    # the service's dense | sparse | hybrid retrieval and fusion (raggen.retrieval); requests may pick a mode
    retrieval: RetrievalSettings = RetrievalSettings()
    s3: dict[str, Any] | None = None
    query_encoder: EncoderSpec = EncoderSpec()  # normalize must match how the index was encoded
    generator: str = Field(min_length=1, description="reader checkpoint: HF id or local folder")
    reranker: str | None = None
    rerank_candidates: int = Field(20, ge=1)
    max_source_length: int = Field(192, ge=8)
    max_target_length: int = Field(32, ge=2)

    @field_validator("s3")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        given = sorted(set(value or {}) & set(S3_CREDENTIAL_FIELDS))
        if given:
            raise ValueError(
                f"S3 credentials are not accepted in Serve args ({', '.join(given)}): a Serve config "
                "shows in the dashboard and in `serve status`; give the replicas AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or an IAM role) in their environment"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        if self.watch_latest and self.index_version is not None:
            raise ValueError("index_version pins a version while watch_latest follows LATEST: set only one")
        return self

    def index_user_config(self) -> dict[str, Any]:
        return IndexUserConfig(
            index=self.index,
            version=self.index_version,
            watch_latest=self.watch_latest,
            watch_interval_s=self.watch_interval_s,
        ).model_dump()


def parse_app_args(args: dict[str, Any] | None) -> AppArgs:
    """Validate ``args``; a bad one is a ConfigError naming the field (``args.max_top_k: ...``)."""
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as exc:
        problems = "; ".join(f"args.{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"raggen serve app: {problems}") from None


GIB = 1024**3
DEFAULT_REQUEST_TIMEOUT_S = 120.0
DEPLOYMENT_NAMES = {"retriever": "Retriever", "reranker": "Reranker", "generator": "Generator", "ingress": "Ingress"}


def deployment_resources(a: AppArgs, role: str) -> dict[str, Any]:
    """``ray_actor_options`` and ``autoscaling_config`` of deployment ``role`` (``retriever``, ...):
    its own ``deployments.<role>`` fields over the shared defaults, field by field."""
    own: DeploymentSection = getattr(a.deployments, role)
    if role == "ingress":  # it only awaits the model deployments: its own small default, never a GPU
        cpus, gpus, memory_gb = a.ingress_num_cpus, 0.0, None
    else:
        cpus, gpus, memory_gb = a.replica_num_cpus, a.replica_num_gpus, a.replica_memory_gb
    actor: dict[str, Any] = {
        "num_cpus": own.num_cpus if own.num_cpus is not None else cpus,
        "num_gpus": own.num_gpus if own.num_gpus is not None else gpus,
    }
    memory_gb = own.memory_gb if own.memory_gb is not None else memory_gb
    if memory_gb is not None:
        actor["memory"] = int(memory_gb * GIB)  # Ray's memory resource is in bytes
    return {"ray_actor_options": actor, "autoscaling_config": own.resolve_autoscaling(a.autoscaling).model_dump()}


def _queue_options(a: AppArgs) -> dict[str, Any]:
    """A bounded queue in front of every deployment: past ``max_queued_requests`` waiting requests
    a caller gets 503 + ``Retry-After`` at once (Serve's backpressure) instead of waiting forever.
    A stopping replica still drains its queue; it checks every ``drain_poll_s`` whether it is done."""
    return dict(
        max_queued_requests=a.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": a.retry_after_s},
        graceful_shutdown_wait_loop_s=a.drain_poll_s,
    )


def _model_options(a: AppArgs, role: str) -> dict[str, Any]:
    """Resources, autoscaling and queue depth of a model deployment (Retriever, Reranker, Generator)."""
    return dict(
        **deployment_resources(a, role),
        # a replica must accept a full batch's worth of requests for @serve.batch to fill it
        max_ongoing_requests=a.max_ongoing_requests or max(5, 2 * a.max_batch_size),
        **_queue_options(a),
    )


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application a Serve config names in ``import_path`` (``raggen.serve.app:build_app``)."""
    a = parse_app_args(args)
    batching = dict(max_batch_size=a.max_batch_size, batch_wait_timeout_s=a.batch_wait_timeout_s)
    retriever = Retriever.options(user_config=a.index_user_config(), **_model_options(a, "retriever")).bind(
        encoder=a.query_encoder.model_dump(),
        s3=a.s3,
        retry_attempts=a.retry_attempts,
        search=a.index_search.model_dump(mode="json"),
        retrieval=a.retrieval.model_dump(),
        **batching,
    )
    generator = Generator.options(**_model_options(a, "generator")).bind(
        path=a.generator,
        max_source_length=a.max_source_length,
        max_target_length=a.max_target_length,
        num_beams=a.num_beams,
        s3=a.s3,
        **batching,
    )
    reranker = (
        Reranker.options(**_model_options(a, "reranker")).bind(path=a.reranker, s3=a.s3, **batching)
        if a.reranker
        else None
    )
    limits = RequestLimits(
        max_question_chars=a.max_question_chars,
        default_top_k=a.default_top_k,
        max_top_k=a.max_top_k,
        max_new_tokens=a.max_new_tokens,
        max_num_beams=a.num_beams,
    )
    ingress = Ingress.options(
        **deployment_resources(a, "ingress"),
        max_ongoing_requests=a.max_ongoing_requests or 64,  # it only awaits the model deployments
        **_queue_options(a),
    )
    retry = dict(attempts=a.retry_attempts, backoff_s=a.retry_backoff_s, retry_after_s=a.retry_after_s)
    return ingress.bind(
        retriever,
        generator,
        reranker=reranker,
        limits=vars(limits),
        api_token_env=a.api_token_env,
        rerank_candidates=a.rerank_candidates,
        allow_unauthenticated=a.allow_unauthenticated,
        retry=retry,
        max_body_bytes=a.max_body_bytes,
    )


def build_app_from_config(**kwargs: Any) -> Application:
    """``build_app`` with keyword arguments (the serve section's fields as plain values)."""
    return build_app(kwargs)


def serve_deploy_config(
    args: dict[str, Any],
    *,
    name: str = APP_NAME,
    route_prefix: str = "/",
    host: str = "127.0.0.1",
    port: int = 8000,
    runtime_env: dict[str, Any] | None = None,
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
) -> dict[str, Any]:
    """The Serve config (the YAML ``serve deploy`` takes) of one raggen app built from ``args``.

    The Retriever's ``user_config`` is listed under ``deployments`` so that a later deploy which
    changes only it hot-swaps the index instead of restarting replicas. ``request_timeout_s``
    (Serve's ``http_options``) bounds a request end to end: past it the proxy answers 408.
    """
    a = parse_app_args(args)
    app: dict[str, Any] = {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [{"name": "Retriever", "user_config": a.index_user_config()}],
    }
    if runtime_env:
        app["runtime_env"] = runtime_env
    http: dict[str, Any] = {"host": host, "port": port}
    if request_timeout_s is not None:
        http["request_timeout_s"] = request_timeout_s
    return {"http_options": http, "applications": [app]}


def with_index(
    config: dict[str, Any],
    index: str,
    version: str | None = None,
    *,
    watch_latest: bool = False,
    watch_interval_s: float = 10.0,
    app_name: str = APP_NAME,
) -> dict[str, Any]:
    """A copy of a Serve config whose app ``app_name`` serves ``index``@``version`` (a hot-swap)."""
    new = copy.deepcopy(config)
    user_config = IndexUserConfig(
        index=index, version=version, watch_latest=watch_latest, watch_interval_s=watch_interval_s
    ).model_dump()
    for app in new["applications"]:
        if app["name"] != app_name:
            continue
        deployments = app.setdefault("deployments", [])
        entry = next((d for d in deployments if d.get("name") == "Retriever"), None)
        if entry is None:
            deployments.append({"name": "Retriever", "user_config": user_config})
        else:
            entry["user_config"] = user_config
        return new
    raise ValueError(f"the Serve config has no application named {app_name!r}")


def deploy_config(config: dict[str, Any]) -> None:
    """Deploy a Serve config on the connected Ray cluster, as ``serve run CONFIG.yaml`` does.

    Declarative, so a redeploy that changes only a ``user_config`` is applied in place.
    (Ray 2.60 exposes this from Python only through the client ``serve run`` itself uses.)
    """
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema)


def wait_until_running(name: str = APP_NAME, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
    """Block until the app is RUNNING; a failed deploy raises RaggenError with Serve's reason."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        status = app.status if app is not None else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RaggenError(f"serve app {name!r} failed to deploy: {app.message}")
        time.sleep(poll_s)
    raise RaggenError(f"serve app {name!r} not running after {timeout_s:.0f}s (status {status})")
