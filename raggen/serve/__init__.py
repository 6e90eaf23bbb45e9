"""Serving: HTTP ingress -> Retriever -> [Reranker] -> Generator on Ray Serve, with index hot-swap.

The schemas, auth and client import without Ray; the deployments and app builders (which import
``ray.serve``) load on first use, so ``raggen ask`` stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

from raggen.serve.auth import install_bearer_auth, token_from_env
from raggen.serve.client import ServiceError, ask, healthy, index_info
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
    "app_args_from_config": "raggen.serve.app",
    "serve_deploy_config": "raggen.serve.app",
    "with_index": "raggen.serve.app",
    "deploy_config": "raggen.serve.app",
    "wait_until_running": "raggen.serve.app",
    "serve_from_config": "raggen.serve.app",
    "AppArgs": "raggen.serve.app",
    "Ingress": "raggen.serve.deployments",
    "Retriever": "raggen.serve.deployments",
    "Reranker": "raggen.serve.deployments",
    "Generator": "raggen.serve.deployments",
    "IndexHolder": "raggen.serve.deployments",
    "IndexUserConfig": "raggen.serve.deployments",
    "NoIndexError": "raggen.serve.deployments",
    "build_http_api": "raggen.serve.deployments",
    "retrieve_batch": "raggen.serve.deployments",
    "rerank_batch": "raggen.serve.deployments",
    "generate_batch": "raggen.serve.deployments",
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
    "ServiceError",
    "ask",
    "check_limits",
    "healthy",
    "index_info",
    "install_bearer_auth",
    "token_from_env",
    *_LAZY,
]
