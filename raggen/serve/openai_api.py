"""OpenAI-compatible ``POST /v1/chat/completions`` beside ``/v1/answer`` (the same service, auth and limits).

The last ``user`` message is the question; ``model`` is any string and is echoed back;
``max_completion_tokens`` (or the older ``max_tokens``) caps the answer (``max_new_tokens``);
``stream: true`` answers with server-sent events, ``data: {chat.completion.chunk}`` lines ending
with ``data: [DONE]``. The evidence rides in an extra ``raggen`` field (OpenAI clients keep unknown
fields: ``completion.raggen`` / ``chunk.model_extra["raggen"]``): the passages and index version on
the response, and on a stream's first and last chunks (the last adds ``timings_ms``).

raggen's own request options go in an extra ``raggen`` object (``extra_body={"raggen": {...}}``
with the openai client): ``top_k``, ``decoding``, ``num_beams`` (1 = greedy, which streams while it
decodes). Other OpenAI fields (``temperature``, ``top_p``, ``stop``, ``user``, ...) are accepted
and ignored: decoding is deterministic. Invalid input is a 422 naming the field as the client sent
it (``max_tokens``, ``messages``, ``raggen.top_k``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from raggen.serve.http_api import INTERNAL_ERROR, jsonable_issues, log, request_id
from raggen.serve.schemas import (
    AnswerRequest,
    Decoding,
    RequestLimits,
    check_limits,
    resolve_defaults,
    validation_issue,
)

ROUTE = "/v1/chat/completions"
# AnswerRequest's field -> how the chat request names it
_FIELD_NAMES = {
    "question": "messages",
    "top_k": "raggen.top_k",
    "decoding": "raggen.decoding",
    "num_beams": "raggen.num_beams",
}


class TextPart(BaseModel):
    """One part of a message's content; only text is read."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and not all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are understood")
        if value is not None and not isinstance(value, (str, list)):
            raise ValueError("must be a string or a list of text parts")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class RaggenOptions(BaseModel):
    """raggen's fields of a chat request (``extra_body={"raggen": {...}}``); unset: the service defaults."""

    model_config = ConfigDict(extra="forbid")

    top_k: StrictInt | None = Field(None, ge=1)
    decoding: Decoding | None = None
    num_beams: StrictInt | None = Field(None, ge=1)


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that mean something here."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1, description="one answer per request")
    raggen: RaggenOptions = RaggenOptions()

    def question(self) -> str | None:
        """The last user message's text (None when there is no user message)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        return None


def to_answer_request(req: ChatCompletionRequest, limits: RequestLimits) -> AnswerRequest:
    """The :class:`AnswerRequest` a chat request asks for (service defaults filled in); raises
    RequestValidationError naming the chat request's fields."""
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    question = req.question()
    if question is None:
        raise RequestValidationError(
            [
                validation_issue(
                    "messages", "must contain a user message (the question)", [m.role for m in req.messages], "missing"
                )
            ]
        )
    body = {
        "question": question,
        "top_k": req.raggen.top_k,
        "max_new_tokens": max_new,
        "num_beams": req.raggen.num_beams,
        **({"decoding": req.raggen.decoding} if req.raggen.decoding else {}),
    }
    names = {**_FIELD_NAMES, "max_new_tokens": max_field}
    try:
        answer = AnswerRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(_renamed(jsonable_issues(exc.errors()), names)) from None
    issues = check_limits(answer, limits)
    if issues:
        raise RequestValidationError(_renamed(issues, names))
    return resolve_defaults(answer, limits)


def _renamed(issues: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for issue in issues:
        loc = [p for p in issue.get("loc", ()) if p != "body"]
        if loc and loc[0] in names:
            loc = [*names[loc[0]].split("."), *loc[1:]]
        out.append({**issue, "loc": ["body", *loc]})
    return out


def _evidence(passages: list[dict], index_version: str, timings_ms: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"passages": passages, "index_version": index_version}
    if timings_ms is not None:
        out["timings_ms"] = timings_ms
    return out


def completion_body(cid: str, model: str, result: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` object from the service's answer."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["answer"]},
                "finish_reason": result.get("finish_reason", "stop"),
                "logprobs": None,
            }
        ],
        "raggen": _evidence(result["passages"], result["index_version"], result.get("timings_ms")),
    }


def _chunk(
    cid: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    raggen: dict[str, Any] | None = None,
) -> str:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if raggen is not None:
        body["raggen"] = raggen
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def sse_stream(
    cid: str, model: str, first: dict[str, Any], events: AsyncIterator[dict[str, Any]], rid: str
) -> AsyncIterator[str]:
    """The SSE lines of a streamed answer: ``first`` is the evidence event, ``events`` the rest
    (``delta`` events, then one ``end``); an error mid-stream is a last ``{"error": ...}`` chunk."""
    created = int(time.time())
    yield _chunk(
        cid,
        created,
        model,
        {"role": "assistant", "content": ""},
        raggen=_evidence(first["passages"], first["index_version"]),
    )
    try:
        async for event in events:
            if event["type"] == "delta":
                yield _chunk(cid, created, model, {"content": event["text"]})
            elif event["type"] == "end":
                yield _chunk(
                    cid,
                    created,
                    model,
                    {},
                    finish_reason=event["finish_reason"],
                    raggen=_evidence(event["passages"], event["index_version"], event["timings_ms"]),
                )
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in-band, as OpenAI does
        # the details go to the log under the request id, never to the client
        log.error("chat completion stream failed (request %s)", rid, exc_info=exc)
        error = {"message": INTERNAL_ERROR, "type": "internal", "request_id": rid}
        yield f"data: {json.dumps({'error': error}, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"


def install_chat_completions(
    app: FastAPI, service: Any, limits: RequestLimits, failed: Callable[[Request, Exception, str], Response]
) -> None:
    """Add ``POST /v1/chat/completions`` to ``app`` (auth, content type, body size and access log
    are the app's; ``failed(request, exc, what)`` turns an error into the app's 503 or 500)."""

    @app.post(ROUTE)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        answer_req = to_answer_request(req, limits)
        rid = request_id(request)
        cid = f"chatcmpl-{rid}"
        if not req.stream:
            try:
                return completion_body(cid, req.model, await service.answer(answer_req))
            except Exception as exc:  # noqa: BLE001 - one line to the client, the traceback to the log
                return failed(request, exc, "chat completion")
        events = service.answer_stream(answer_req).__aiter__()
        try:  # retrieval runs before the status line: its failures are still HTTP errors
            first = await events.__anext__()
        except Exception as exc:  # noqa: BLE001
            return failed(request, exc, "chat completion")
        return StreamingResponse(
            sse_stream(cid, req.model, first, events, rid),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
