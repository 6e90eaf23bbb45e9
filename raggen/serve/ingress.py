"""The HTTP front of the serve graph on Ray Serve: the Ingress deployment (FastAPI) that validates
a request and calls Retriever -> [Reranker] -> Generator (:mod:`raggen.serve.deployments`) through
their handles. The FastAPI app itself is :func:`~raggen.serve.http_api.build_http_api`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from ray import serve

from raggen.serve.auth import DEFAULT_TOKEN_ENV, token_from_env
from raggen.serve.http_api import build_http_api
from raggen.serve.metrics import HttpMetrics, StageMetrics
from raggen.serve.resilience import RetryPolicy, call_with_retry, check_exposure, is_loopback
from raggen.serve.schemas import AnswerRequest, RequestLimits, validation_issue

if TYPE_CHECKING:  # a type only: the HTTP replica imports neither torch nor transformers (~400 MB, seconds of start-up)
    from raggen.retrieval.search import Hit

log = logging.getLogger("ray.serve").getChild(__name__)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Ingress:
    """HTTP front (FastAPI, built per replica with the configured limits and token): validates,
    then calls Retriever -> [Reranker] -> Generator through their handles.

    Each model call is idempotent, so one whose replica died is sent again (``retry`` attempts in
    all, :func:`~raggen.serve.resilience.call_with_retry`); a full queue is a 503 with
    ``Retry-After``. At start it refuses to serve on a non-loopback address without a token
    unless ``allow_unauthenticated`` (:func:`~raggen.serve.resilience.check_exposure`).
    """

    def __init__(
        self,
        retriever: Any,
        generator: Any,
        reranker: Any = None,
        limits: dict | None = None,
        api_token_env: str = DEFAULT_TOKEN_ENV,
        rerank_candidates: int = 20,
        allow_unauthenticated: bool = False,
        retry: dict | None = None,
        max_body_bytes: int = 64 * 1024,
    ):
        self.retriever = retriever
        self.generator = generator
        self.generator_stream = generator.options(stream=True)
        self.reranker = reranker
        self.limits = RequestLimits(**(limits or {}))
        self.api_token_env = api_token_env
        self.rerank_candidates = rerank_candidates
        self.retry = RetryPolicy(**(retry or {}))
        self.max_body_bytes = max_body_bytes
        self.token = token_from_env(api_token_env)
        self.host = serving_host()
        check_exposure(self.host, self.token, allow_unauthenticated, token_env=api_token_env)
        self.http_metrics = HttpMetrics()
        self.stage_metrics = StageMetrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        def record(entry: dict) -> None:
            self.http_metrics.request(entry["route"], entry["method"], entry["status"], entry["latency_ms"])

        return build_http_api(
            self,
            self.limits,
            self.token,
            on_request=record,
            max_body_bytes=self.max_body_bytes,
            retry_after_s=self.retry.retry_after_s,
            show_details=self.token is not None or is_loopback(self.host),
        )

    async def _call(self, what: str, method: Any, *args: Any) -> Any:
        """``await method.remote(*args)``, sent again if the replica that took it died."""
        return await call_with_retry(lambda: method.remote(*args), self.retry, what)

    async def _evidence(self, req: AnswerRequest) -> tuple[list[Hit], str, dict[str, float], float]:
        """Retrieve (and rerank): the passages, their index version, the timings so far, the start time."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        fetch = max(req.top_k, self.rerank_candidates) if self.reranker is not None else req.top_k
        retrieved = await self._call("retrieve", self.retriever.retrieve, req.question, fetch, req.retrieval)
        if "error" in retrieved:  # a mode this index version cannot serve: the request's fault
            raise RequestValidationError(
                [validation_issue("retrieval", retrieved["error"], req.retrieval, "value_error")]
            )
        hits = retrieved["passages"]
        timings["retrieve"] = _ms_since(start)
        if self.reranker is not None:
            t = time.perf_counter()
            hits = await self._call("rerank", self.reranker.rerank, req.question, hits, req.top_k)
            timings["rerank"] = _ms_since(t)
        return hits, retrieved["index_version"], timings, start

    async def answer(self, req: AnswerRequest) -> dict:
        hits, version, timings, start = await self._evidence(req)
        t = time.perf_counter()
        out = await self._call(
            "generate", self.generator.generate, req.question, hits, req.decoding, req.max_new_tokens, req.num_beams
        )
        timings["generate"] = _ms_since(t)
        timings["total"] = _ms_since(start)
        self.stage_metrics.observe(timings)
        # finish_reason / completion_tokens are for the chat route; /v1/answer's response model drops them
        return {
            "answer": out["text"],
            "passages": hits,
            "index_version": version,
            "timings_ms": timings,
            "finish_reason": out["finish_reason"],
            "completion_tokens": out["completion_tokens"],
        }

    async def answer_stream(self, req: AnswerRequest) -> AsyncIterator[dict]:
        """``evidence`` (passages, index version), ``delta`` pieces of the answer, then ``end``."""
        hits, version, timings, start = await self._evidence(req)
        yield {"type": "evidence", "passages": hits, "index_version": version}
        t = time.perf_counter()
        summary: dict = {"finish_reason": "stop", "completion_tokens": 0}
        async for item in self._stream_generation(req, hits):
            if "delta" in item:
                yield {"type": "delta", "text": item["delta"]}
            else:
                summary = item
        timings["generate"] = _ms_since(t)
        timings["total"] = _ms_since(start)
        self.stage_metrics.observe(timings)
        yield {
            "type": "end",
            "finish_reason": summary["finish_reason"],
            "completion_tokens": summary["completion_tokens"],
            "passages": hits,
            "index_version": version,
            "timings_ms": timings,
        }

    async def _stream_generation(self, req: AnswerRequest, hits: list[Hit]) -> AsyncIterator[dict]:
        """The Generator's stream, restarted on another replica if its replica dies mid-answer.

        Decoding is deterministic, so a restarted stream repeats the text already sent: it is
        skipped, and only what extends it is passed on.
        """
        sent = ""
        # each attempt runs inside call_with_retry; its items flow out through this queue as they
        # come, so the client still sees the answer as it is decoded
        queue: asyncio.Queue[dict | None] = asyncio.Queue()

        async def run_once() -> None:
            nonlocal sent
            text = ""
            async for item in self.generator_stream.generate_stream.remote(
                req.question, hits, req.decoding, req.max_new_tokens, req.num_beams
            ):
                if "delta" not in item:
                    await queue.put(item)
                    continue
                text += item["delta"]
                if len(text) > len(sent) and text.startswith(sent):
                    piece, sent = text[len(sent) :], text
                    await queue.put({"delta": piece})

        async def produce() -> None:
            try:
                await call_with_retry(run_once, self.retry, "generate (stream)")
            finally:
                await queue.put(None)

        task = asyncio.ensure_future(produce())
        try:
            while (item := await queue.get()) is not None:
                yield item
            await task  # re-raises what ended the stream
        finally:
            if not task.done():
                task.cancel()

    async def index_info(self) -> dict:
        return await self._call("index info", self.retriever.index_info)

    def check_health(self) -> None:
        return None  # stateless: it is healthy when it runs; the model deployments check themselves


def serving_host() -> str | None:
    """The address Serve's HTTP proxies listen on (``http_options.host``), asked of the controller;
    None when it cannot be told (then it counts as exposed: the check fails closed)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except Exception as exc:  # noqa: BLE001 - unknown counts as exposed
        log.warning("cannot tell which address Serve listens on (%s): treating it as exposed", exc)
        return None


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)
