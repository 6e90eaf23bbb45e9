"""Serving: HTTP ingress -> Retriever -> [Reranker] -> Generator on Ray Serve, with index hot-swap.

The schemas, auth and client import without Ray; the rest loads on first use, so ``raggen ask``
stays quick: ``live_index`` (a loaded index version) and ``index_holder`` (its hot swap),
``pipeline`` (the stages as functions),
``http_api`` + ``openai_api`` (the FastAPI app), ``metrics`` (Prometheus, through Ray),
``resilience`` (retries of model calls whose replica died, 503 on overload, exposure rules), and the
Serve side: ``deployments`` (Retriever, Reranker, Generator), ``ingress`` (Ingress) and ``app`` (builders).
"""

from __future__ import annotations

from raggen.lazy import lazy_exports
from raggen.serve.auth import install_bearer_auth, token_from_env
from raggen.serve.client import ServiceError, ask, healthy, index_info
from raggen.serve.resilience import RetryPolicy, ServiceUnavailable, check_exposure, is_loopback
from raggen.serve.schemas import (
    AnswerRequest,
    AnswerResponse,
    IndexInfo,
    Passage,
    RequestLimits,
    check_limits,
)

_LAZY = {
    "build_app": "app",
    "build_app_from_config": "app",
    "serve_deploy_config": "app",
    "with_index": "app",
    "deploy_config": "app",
    "wait_until_running": "app",
    "AppArgs": "app",
    "Ingress": "ingress",
    "Retriever": "deployments",
    "Reranker": "deployments",
    "Generator": "deployments",
    "IndexHolder": "index_holder",
    "IndexUserConfig": "live_index",
    "LiveIndex": "live_index",
    "NoIndexError": "live_index",
    "build_http_api": "http_api",
    "retrieve_batch": "pipeline",
    "rerank_batch": "pipeline",
    "generate_batch": "pipeline",
    "generate_outputs": "pipeline",
    "ChatCompletionRequest": "openai_api",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "AnswerRequest",
    "AnswerResponse",
    "IndexInfo",
    "Passage",
    "RequestLimits",
    "RetryPolicy",
    "ServiceError",
    "ServiceUnavailable",
    "ask",
    "check_exposure",
    "check_limits",
    "healthy",
    "index_info",
    "install_bearer_auth",
    "is_loopback",
    "token_from_env",
    *_LAZY,
]
