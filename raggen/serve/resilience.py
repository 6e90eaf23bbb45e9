"""How the service behaves when parts of it fail: retries, overload, exposure.

* :func:`call_with_retry`: the Ingress's calls to the model deployments (retrieve, rerank,
  generate) are idempotent, so a call whose replica died (Ray's ``RayActorError`` /
  ``ActorDiedError`` / ``ActorUnavailableError``, Serve's ``ReplicaUnavailableError`` /
  ``DeploymentUnavailableError``) is sent again, up to :class:`RetryPolicy` ``attempts`` in all
  with a short jittered backoff; Serve routes the retry to a live replica. A full queue
  (Serve's ``BackPressureError``: ``max_queued_requests`` reached) is not retried: it becomes
  :class:`ServiceUnavailable`, which the HTTP app answers with 503 + ``Retry-After``.
* :func:`check_exposure`: serving on a non-loopback address without a bearer token is refused
  (a ConfigError naming ``serve.host`` / ``serve.allow_unauthenticated``) unless explicitly allowed.

Plain Python: Ray's exception classes are imported when first needed, so the HTTP app and these
rules test without Ray.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from raggen.errors import ConfigError, RaggenError

log = logging.getLogger("ray.serve").getChild(__name__)
T = TypeVar("T")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class ServiceUnavailable(RaggenError):
    """The service cannot answer now (a full queue, replicas gone): HTTP 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts (first try included) of an idempotent model call whose replica died, and the backoff."""

    attempts: int = 3
    backoff_s: float = 0.1  # before the 2nd attempt; doubles after each, jittered to 50-100%
    max_backoff_s: float = 2.0
    retry_after_s: float = 1.0  # what a 503 tells the client to wait

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.retry_after_s < 0:
            raise ValueError("backoff_s, max_backoff_s and retry_after_s must be >= 0")

    def delay_s(self, retry: int) -> float:
        """The wait before retry number ``retry`` (0-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2**retry) * random.uniform(0.5, 1.0)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (Ray's ``RayTaskError.cause``, ``__cause__``), each once."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([getattr(e, "cause", None), e.__cause__])


def replica_failure(exc: BaseException) -> bool:
    """True when ``exc`` says the replica that took the call died or cannot be reached (retry it)."""
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    kinds = (ReplicaUnavailableError, DeploymentUnavailableError)
    return actor_lost(exc) or any(isinstance(e, kinds) for e in _chain(exc))


def actor_lost(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) says a Ray actor that was called is dead or unreachable."""
    from ray.exceptions import RayActorError

    return any(isinstance(e, RayActorError) for e in _chain(exc))


def backpressure(exc: BaseException) -> float | None:
    """The ``Retry-After`` seconds of a Serve ``BackPressureError`` (0.0 when it sets none), else None."""
    from ray.serve.exceptions import BackPressureError

    for e in _chain(exc):
        if isinstance(e, BackPressureError):
            return float(e.retry_after_s or 0.0)
    return None


async def call_with_retry(
    call: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str, on_retry: Callable[[str], None] | None = None
) -> T:
    """``await call()``, again on a replica failure, at most ``policy.attempts`` times in all.

    A full queue (BackPressureError) and running out of attempts raise :class:`ServiceUnavailable`;
    any other error (the model failed) propagates unchanged: retrying it would fail the same way.
    """
    for attempt in range(policy.attempts):
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 - classified below; the rest is re-raised as is
            wait = backpressure(exc)
            if wait is not None:
                raise ServiceUnavailable(f"{what}: overloaded, queue full", wait or policy.retry_after_s) from exc
            if not replica_failure(exc):
                raise
            if attempt + 1 >= policy.attempts:
                log.error(
                    "%s: replica failure on attempt %d of %d, giving up: %s",
                    what,
                    attempt + 1,
                    policy.attempts,
                    _first_line(exc),
                )
                raise ServiceUnavailable(
                    f"{what}: no replica answered after {policy.attempts} attempts", policy.retry_after_s
                ) from exc
            log.warning(
                "%s: replica failure on attempt %d of %d, retrying: %s",
                what,
                attempt + 1,
                policy.attempts,
                _first_line(exc),
            )
            if on_retry is not None:
                on_retry(what)
            await asyncio.sleep(policy.delay_s(attempt))
    raise AssertionError("unreachable")  # the loop returns or raises


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# ------------------------------------------------------------------------------------ exposure


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual names of the loopback interface."""
    if not host:
        return False
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_exposure(
    host: str | None, token: str | None, allow_unauthenticated: bool, *, token_env: str, section: str = "serve"
) -> None:
    """Refuse to serve on a non-loopback ``host`` without a token unless ``allow_unauthenticated``.

    Raises ConfigError naming ``{section}.host`` and ``{section}.allow_unauthenticated``; when it is
    allowed, logs a WARNING (an open service should never be a surprise in the logs).
    """
    if token or is_loopback(host):
        return
    where = f"{host!r}" if host else "an unknown address"
    if not allow_unauthenticated:
        raise ConfigError(
            f"{section}.host: serving on {where} (not loopback) without an API token is refused: set the "
            f"{token_env} environment variable on the replicas (e.g. from a Kubernetes Secret), serve on "
            f"127.0.0.1, or set {section}.allow_unauthenticated: true to serve without authentication "
            "(in a Serve config file: http_options.host, args.allow_unauthenticated)"
        )
    log.warning(
        "serving on %s without an API token (%s.allow_unauthenticated is true): every route is open "
        "to anyone who can reach it",
        where,
        section,
    )
