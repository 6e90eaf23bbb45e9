"""A small HTTP client for a running raggen service (used by ``raggen ask``, tests and benchmarks)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from raggen.errors import RaggenError
from raggen.serve.auth import DEFAULT_TOKEN_ENV, token_from_env


class ServiceError(RaggenError):
    """The service answered with an error status; the message is its one-line reason."""

    def __init__(self, status_code: int, message: str):
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


def _headers(token: str | None, token_env: str) -> dict[str, str]:
    token = token if token is not None else token_from_env(token_env)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or body)
    return str(body)


RETRY_STATUSES = (502, 503, 504)


def _retryable(response: httpx.Response) -> bool:
    """Worth sending again: overload / gateway statuses, and a 500 that is not raggen's own error
    body (``request_id`` in JSON) but the proxy's: the Ingress replica died mid-request."""
    if response.status_code in RETRY_STATUSES:
        return True
    if response.status_code != 500:
        return False
    try:
        body = response.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and "request_id" in body)


def _wait_s(response: httpx.Response | None, retry: int, max_wait_s: float) -> float:
    """``Retry-After`` (seconds) when the service sent one, else a short doubling backoff; capped."""
    header = response.headers.get("retry-after") if response is not None else None
    wait = float(header) if header and header.strip().isdigit() else 0.2 * 2**retry
    return min(wait, max_wait_s)


def _request(
    method: str,
    url: str,
    *,
    json: Any = None,
    token: str | None = None,
    token_env: str = DEFAULT_TOKEN_ENV,
    timeout: float = 60.0,
    client: httpx.Client | None = None,
    retries: int = 2,
    max_wait_s: float = 5.0,
) -> Any:
    """One idempotent call (every raggen route is), sent again up to ``retries`` times after a
    connection failure, a 502/503/504 (honouring ``Retry-After``, at most ``max_wait_s``) or a
    proxy's 500; raggen's own 500 (an internal error, with a request id) is not retried."""
    headers = _headers(token, token_env)
    send = client.request if client is not None else httpx.request
    for retry in range(retries + 1):
        try:
            response = send(method, url, json=json, headers=headers, timeout=timeout)
        except httpx.TimeoutException as e:
            raise RaggenError(f"no answer from {url} within {timeout:.0f}s: {e}") from None
        except httpx.TransportError as e:
            if retry >= retries:
                raise RaggenError(f"cannot reach {url}: {e}") from None
            time.sleep(_wait_s(None, retry, max_wait_s))
            continue
        if response.status_code < 400:
            return response.json()
        if retry >= retries or not _retryable(response):
            raise ServiceError(response.status_code, _reason(response))
        time.sleep(_wait_s(response, retry, max_wait_s))
    raise AssertionError("unreachable")  # the loop returns or raises


def ask(
    url: str,
    question: str,
    *,
    top_k: int | None = None,
    decoding: str = "rag-token",
    max_new_tokens: int | None = None,
    token: str | None = None,
    token_env: str = DEFAULT_TOKEN_ENV,
    timeout: float = 60.0,
    client: httpx.Client | None = None,
) -> dict[str, Any]:
    """``POST {url}/v1/answer``; returns ``{"answer", "passages", "index_version", "timings_ms"}``.

    ``token`` defaults to the ``token_env`` environment variable; omitted numbers take the
    service's defaults. An overloaded (503) or briefly unreachable service is asked again (twice,
    honouring ``Retry-After``). Raises ServiceError (status + the service's reason) on 4xx/5xx.
    """
    body: dict[str, Any] = {"question": question, "decoding": decoding}
    if top_k is not None:
        body["top_k"] = top_k
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    return _request(
        "POST",
        f"{url.rstrip('/')}/v1/answer",
        json=body,
        token=token,
        token_env=token_env,
        timeout=timeout,
        client=client,
    )


def index_info(
    url: str, *, token: str | None = None, token_env: str = DEFAULT_TOKEN_ENV, timeout: float = 10.0
) -> dict[str, Any]:
    """``GET {url}/v1/index``: the live index version (and the last refused swap, if any)."""
    return _request("GET", f"{url.rstrip('/')}/v1/index", token=token, token_env=token_env, timeout=timeout)


def healthy(url: str, timeout: float = 5.0) -> bool:
    """True when ``GET {url}/healthz`` answers 200."""
    try:
        return httpx.get(f"{url.rstrip('/')}/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
