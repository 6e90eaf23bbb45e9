"""Serving: HTTP ingress -> Retriever -> [Reranker] -> Generator on Ray Serve, with index hot-swap.

The schemas, auth and client import without Ray; the rest loads on first use, so ``raggen ask``
stays quick: ``live_index`` (a loaded index version) and ``index_holder`` (its hot swap),
``pipeline`` (the stages as functions),
``http_api`` + ``openai_api`` (the FastAPI app), ``metrics`` (Prometheus, through Ray),
``resilience`` (retries of model calls whose replica died, 503 on overload, exposure rules), and the
Serve side: ``deployments`` (Retriever, Reranker, Generator), ``ingress`` (Ingress) and ``app`` (builders).
"""

from __future__ import annotations

import importlib
from typing import Any

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
    "build_app": "raggen.serve.app",
    "build_app_from_config": "raggen.serve.app",
    "serve_deploy_config": "raggen.serve.app",
    "with_index": "raggen.serve.app",
    "deploy_config": "raggen.serve.app",
    "wait_until_running": "raggen.serve.app",
    "AppArgs": "raggen.serve.app",
    "Ingress": "raggen.serve.ingress",
    "Retriever": "raggen.serve.deployments",
    "Reranker": "raggen.serve.deployments",
    "Generator": "raggen.serve.deployments",
    "IndexHolder": "raggen.serve.index_holder",
    "IndexUserConfig": "raggen.serve.live_index",
    "LiveIndex": "raggen.serve.live_index",
    "NoIndexError": "raggen.serve.live_index",
    "build_http_api": "raggen.serve.http_api",
    "retrieve_batch": "raggen.serve.pipeline",
    "rerank_batch": "raggen.serve.pipeline",
    "generate_batch": "raggen.serve.pipeline",
    "generate_outputs": "raggen.serve.pipeline",
    "ChatCompletionRequest": "raggen.serve.openai_api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raggen.serve' has no attribute {name!r}")


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
