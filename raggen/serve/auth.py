"""Optional bearer-token guard for the HTTP API (DESIGN: every route but ``/healthz``).

The token lives in the environment (``RAGGEN_API_TOKEN`` by default; a Kubernetes Secret or the
Serve config's ``runtime_env.env_vars``), never in the app's args, so it does not show up in the
Serve dashboard or in a deployed config.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

DEFAULT_TOKEN_ENV = "RAGGEN_API_TOKEN"
OPEN_PATHS: tuple[str, ...] = ("/healthz",)


def token_from_env(env_var: str = DEFAULT_TOKEN_ENV) -> str | None:
    """The configured token, or None (auth off) when the variable is unset or blank."""
    token = os.environ.get(env_var, "").strip()
    return token or None


def bearer_token(authorization: str | None) -> str | None:
    """``"Bearer abc"`` -> ``"abc"``; anything else -> None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def is_authorized(authorization: str | None, token: str) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a guess was right."""
    given = bearer_token(authorization)
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _unauthorized(message: str) -> JSONResponse:
    return JSONResponse(
        status_code=401,
        content={
            "detail": [{"type": "unauthorized", "loc": ["header", "authorization"], "msg": message}],
            "error": f"authorization: {message}",
        },
        headers={"WWW-Authenticate": 'Bearer realm="raggen"'},
    )


BEARER_SCHEME = "bearerAuth"


def declare_bearer_scheme(app: FastAPI, open_paths: Iterable[str] = OPEN_PATHS) -> None:
    """Make ``/openapi.json`` (and so ``/docs``) say that every operation but ``open_paths`` needs
    ``Authorization: Bearer <token>`` (an HTTP bearer security scheme, required globally)."""
    open_set = frozenset(open_paths)
    build = app.openapi  # FastAPI's own generator, cached on the app

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "the service's API token (RAGGEN_API_TOKEN on the replicas)",
        }
        schema["security"] = [{BEARER_SCHEME: []}]
        for path in open_set:
            for operation in schema.get("paths", {}).get(path, {}).values():
                operation["security"] = []  # open: no token needed
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_bearer_auth(app: FastAPI, token: str | None, open_paths: Iterable[str] = OPEN_PATHS) -> None:
    """Guard every route of ``app`` except ``open_paths`` with ``Authorization: Bearer <token>``.

    ``token=None`` installs nothing (auth off). Paths are matched after the route prefix Serve
    strips (``root_path``), so ``/healthz`` stays open under any prefix; ``/docs`` and
    ``/openapi.json`` are guarded like the API, and the schema declares the bearer scheme.
    """
    if token is None:
        return
    open_set = frozenset(open_paths)
    declare_bearer_scheme(app, open_set)

    @app.middleware("http")
    async def _require_bearer(request: Request, call_next):
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path in open_set:
            return await call_next(request)
        header = request.headers.get("authorization")
        if header is None:
            return _unauthorized("missing 'Authorization: Bearer <token>' header")
        if not is_authorized(header, token):
            return _unauthorized("invalid bearer token")
        return await call_next(request)
