"""The HTTP API (FastAPI) over a service object: routes, validation, errors, auth, access log.

``build_http_api(service, limits, token)`` is plain FastAPI, so the contract is tested with
``TestClient`` and a stand-in service; the Ingress deployment builds it per replica.

Every request gets a request id (Serve's ``x-request-id``, which Serve's proxy also returns as the
``X-Request-ID`` header; without Serve in front, a new one, returned as ``X-Request-Id``) and one
JSON access-log line on the ``raggen.access`` logger::

    {"time": "2026-01-02T03:04:05.678Z", "type": "access", "request_id": "…", "method": "POST",
     "route": "/v1/answer", "path": "/v1/answer", "status": 200, "latency_ms": 41.7}

In a replica the line goes to the process's stderr (the replica's worker ``.err`` file in Ray's
log folder, and the driver's console with ``log_to_driver``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raggen.serve.auth import install_bearer_auth
from raggen.serve.live_index import NoIndexError
from raggen.serve.resilience import ServiceUnavailable
from raggen.serve.schemas import (
    AnswerRequest,
    AnswerResponse,
    Health,
    IndexInfo,
    RequestLimits,
    check_limits,
    resolve_defaults,
    summarize_issues,
)

# a child of Serve's logger, so failures land in the replica's log file next to Serve's own
log = logging.getLogger("ray.serve").getChild(__name__)
ACCESS_LOGGER = "raggen.access"
REQUEST_ID_HEADER = "x-request-id"
OTHER_ROUTE = "other"  # the route label of a path no route matches (keeps the label set small)

AccessEntry = dict[str, Any]  # one access-log line: request_id, method, route, path, status, latency_ms
RequestHook = Callable[[AccessEntry], None]

JSON_TYPES = ("application/json",)
DEFAULT_MAX_BODY_BYTES = 64 * 1024
INTERNAL_ERROR = "internal error"
NO_INDEX = "no verified index loaded yet"


def access_logger() -> logging.Logger:
    """``raggen.access``: one bare JSON object per line on stderr, not propagated (configured once)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not getattr(logger, "_raggen_configured", False):
        handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger._raggen_configured = True  # type: ignore[attr-defined]
    return logger


def request_id(request: Request) -> str:
    """The id :class:`AccessLog` gave this request (a new one outside the middleware)."""
    return str(request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex)


def route_path(scope: Scope) -> str:
    """The request path under the app (Serve's route prefix, ``root_path``, removed)."""
    path = scope.get("path", "/")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


class AccessLog:
    """Pure ASGI middleware (outermost): request id, one access-log line and the ``on_request``
    hook (metrics) per HTTP request, timed until the last body byte (streams included)."""

    def __init__(self, app: ASGIApp, routes: Callable[[], set[str]], on_request: RequestHook | None = None):
        self.app = app
        self._routes = routes
        self._known: set[str] | None = None
        self.on_request = on_request
        self.logger = access_logger()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        rid = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500  # if the app raises before it responds, Starlette's error middleware sends a 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if given is None:  # behind Serve's proxy the request has one and the proxy returns it
                    MutableHeaders(scope=message).append("X-Request-Id", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, rid, status, (time.perf_counter() - start) * 1000.0)

    def _record(self, scope: Scope, rid: str, status: int, latency_ms: float) -> None:
        if self._known is None:
            self._known = self._routes()
        path = route_path(scope)
        entry: AccessEntry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "type": "access",
            "request_id": rid,
            "method": scope.get("method", ""),
            "route": path if path in self._known else OTHER_ROUTE,
            "path": path[:200],
            "status": status,
            "latency_ms": round(latency_ms, 3),
        }
        try:
            self.logger.info(json.dumps(entry, separators=(",", ":")))
            if self.on_request is not None:
                self.on_request(entry)
        except Exception:  # noqa: BLE001 - logging or metrics must never fail a request
            log.exception("access log / request metrics failed")


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


def error_response(
    status: int, field: str, msg: str, kind: str, rid: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error body: ``{"detail": [...], "error": "field: reason"}`` (+ ``request_id`` if given)."""
    content: dict[str, Any] = {
        "detail": [{"type": kind, "loc": field.split("."), "msg": msg}],
        "error": f"{field}: {msg}",
    }
    if rid is not None:
        content["request_id"] = rid
    return JSONResponse(status_code=status, content=content, headers=headers)


def internal_error(request: Request, exc: BaseException, what: str) -> JSONResponse:
    """A 500 that says "internal error" and gives the request id; the exception and its traceback
    go to the log under that id, never to the client (they can name files, hosts, buckets)."""
    rid = request_id(request)
    log.error("%s failed (request %s)", what, rid, exc_info=exc)
    return error_response(500, "server", INTERNAL_ERROR, "internal", rid)


def unavailable(request: Request, exc: BaseException, retry_after_s: float, show_details: bool) -> JSONResponse:
    """503 + ``Retry-After``: no index loaded yet (:class:`NoIndexError`) or no capacity
    (:class:`ServiceUnavailable`: a full queue, replicas gone). An index error's text names the
    index root and the refused version's problem: only for callers allowed to see internals."""
    rid = request_id(request)
    headers = {"Retry-After": str(max(0, math.ceil(retry_after_s)))}
    if isinstance(exc, NoIndexError):
        log.warning("no index to answer from (request %s): %s", rid, exc)
        message = str(exc) if show_details else NO_INDEX
        return error_response(503, "index", message, "no_index", rid, headers=headers)
    log.warning("service unavailable (request %s): %s", rid, exc)
    return error_response(503, "server", str(exc), "unavailable", rid, headers=headers)


def redact_index_info(info: dict[str, Any]) -> dict[str, Any]:
    """``GET /v1/index`` for a caller who may not see internals: versions and counts, no index root
    URI, no error text (the log has them)."""
    out = dict(info)
    out["index"] = None
    if out.get("requested"):
        out["requested"] = str(out["requested"]).rpartition("@")[2]
    if out.get("last_error"):
        out["last_error"] = "a requested index version could not be served; details are in the service log"
    return out


def build_http_api(
    service: Any,
    limits: RequestLimits,
    token: str | None,
    on_request: RequestHook | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after_s: float = 1.0,
    show_details: bool | None = None,
) -> FastAPI:
    """The FastAPI app of the HTTP contract over ``service`` (``answer(req)``/``index_info()``, async;
    ``answer_stream(req)`` for a streamed chat completion).

    Every error is a JSON body ``{"detail": [...], "error": "field: reason"}`` naming the field:
    422 for invalid input (types by pydantic, bounds by :func:`check_limits`), 415 for a non-JSON
    body, 413 for a body over ``max_body_bytes`` (before it is parsed), 401 without the bearer
    token (when one is set), 503 + ``Retry-After`` while no index is loaded or the service is
    overloaded, 500 "internal error" with the request id for anything else (details in the log).
    ``show_details`` (default: a token is set, i.e. every caller is authenticated) lets
    ``/v1/index`` and 503 bodies name the index root and the refused version's error.
    ``on_request(entry)`` sees every access-log entry (metrics).
    """
    from raggen.serve.openai_api import install_chat_completions

    details = token is not None if show_details is None else show_details
    app = FastAPI(title="raggen", summary="retrieval-augmented answers with evidence")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        issues = jsonable_issues(exc.errors())
        return JSONResponse(status_code=422, content={"detail": issues, "error": summarize_issues(issues)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # what no route caught
        return internal_error(request, exc, f"{request.method} {route_path(request.scope)}")

    @app.middleware("http")
    async def _json_only(request: Request, call_next):
        if request.method == "POST" and not _is_json(request.headers.get("content-type")):
            return error_response(
                415,
                "header.content-type",
                f"must be application/json, got {request.headers.get('content-type') or 'none'!r}",
                "unsupported_media_type",
            )
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    install_bearer_auth(app, token)  # after the checks above = outside them: 401 comes first
    app.add_middleware(AccessLog, routes=lambda: {getattr(r, "path", "") for r in app.routes}, on_request=on_request)

    def failed(request: Request, exc: Exception, what: str) -> JSONResponse:
        if isinstance(exc, RequestValidationError):  # found by the service (e.g. a retrieval mode it lacks)
            issues = jsonable_issues(exc.errors())
            return JSONResponse(status_code=422, content={"detail": issues, "error": summarize_issues(issues)})
        if isinstance(exc, (NoIndexError, ServiceUnavailable)):
            wait = exc.retry_after_s if isinstance(exc, ServiceUnavailable) else retry_after_s
            return unavailable(request, exc, wait, details)
        return internal_error(request, exc, what)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/index", response_model=IndexInfo)
    async def index(request: Request) -> Any:
        try:
            info = await service.index_info()
        except Exception as exc:  # noqa: BLE001 - one line to the client, the traceback to the log
            return failed(request, exc, "index info")
        return info if details else redact_index_info(info)

    @app.post("/v1/answer", response_model=AnswerResponse)
    async def answer(req: AnswerRequest, request: Request) -> Any:
        issues = check_limits(req, limits)
        if issues:
            raise RequestValidationError(issues)
        try:
            return await service.answer(resolve_defaults(req, limits))
        except Exception as exc:  # noqa: BLE001 - one line to the client, the traceback to the log
            return failed(request, exc, "answer")

    install_chat_completions(app, service, limits, failed)
    return app


class BodyLimit:
    """Pure ASGI middleware: a request body over ``max_bytes`` gets 413 before anything parses it.

    A declared ``Content-Length`` over the limit is refused without reading a byte; otherwise the
    body is read (at most ``max_bytes`` + one chunk, so a chunked upload that never ends is cut
    off too) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(scope, receive, send, declared)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, f"more than {self.max_bytes}")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        log.warning("request body refused: %s bytes, limit %d", size, self.max_bytes)
        response = error_response(
            413,
            "body",
            f"must be at most {self.max_bytes} bytes (got {size})",
            "too_large",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def jsonable_issues(errors: Any) -> list[dict[str, Any]]:
    """pydantic error dicts made JSON-safe (``ctx`` may hold exception objects, ``input`` bytes)."""
    out = []
    for issue in errors:
        issue = dict(issue)
        if "ctx" in issue:
            issue["ctx"] = {k: str(v) for k, v in issue["ctx"].items()}
        out.append(jsonable_encoder(issue, custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")}))
    return out
