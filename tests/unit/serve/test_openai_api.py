"""The OpenAI-compatible chat route without Ray: the ``openai`` client against the FastAPI app
(``TestClient`` is an httpx client), completions, SSE streams, validation naming the chat
request's fields, auth, and errors before and during a stream."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from raggen.serve.http_api import build_http_api
from raggen.serve.live_index import NoIndexError
from raggen.serve.schemas import AnswerRequest, RequestLimits

LIMITS = RequestLimits(max_question_chars=50, default_top_k=3, max_top_k=5, max_new_tokens=8, max_num_beams=2)
PASSAGES = [{"id": "p1", "title": "Mill", "text": "The mill is in Ost.", "score": 1.5}]
PIECES = ["The", " mill", " is", " in", " Ost"]


class StreamingService:
    """Stands in for the Ingress: answers with the request it got, and streams a fixed answer."""

    def __init__(self, fail_at: str | None = None):
        self.fail_at = fail_at  # "evidence" (before the stream) or "delta" (during it)
        self.requests: list[AnswerRequest] = []

    async def answer(self, req: AnswerRequest) -> dict:
        self.requests.append(req)
        return {
            "answer": "".join(PIECES),
            "passages": PASSAGES,
            "index_version": "v7",
            "timings_ms": {"total": 1.0},
            "finish_reason": "stop",
            "completion_tokens": 5,
        }

    async def answer_stream(self, req: AnswerRequest):
        self.requests.append(req)
        if self.fail_at == "evidence":
            raise NoIndexError("no verified index loaded")
        yield {"type": "evidence", "passages": PASSAGES, "index_version": "v7"}
        for n, piece in enumerate(PIECES):
            if self.fail_at == "delta" and n == 2:
                raise RuntimeError("decoder died\ntraceback")
            yield {"type": "delta", "text": piece}
        yield {
            "type": "end",
            "finish_reason": "length",
            "completion_tokens": 5,
            "passages": PASSAGES,
            "index_version": "v7",
            "timings_ms": {"retrieve": 1.0, "generate": 2.0, "total": 3.0},
        }

    async def index_info(self) -> dict:
        return {"version": "v7", "index": "/idx", "num_passages": 1, "loaded_at": 0.0}


def _app(service=None, token: str | None = "tok") -> TestClient:
    return TestClient(build_http_api(service or StreamingService(), LIMITS, token))


def _client(http: TestClient, key: str = "tok") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


USER = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "old question"},
    {"role": "assistant", "content": "old answer"},
    {"role": "user", "content": "Where is the mill?"},
]


def test_completion_echoes_model_and_carries_the_evidence():
    service = StreamingService()
    completion = _client(_app(service)).chat.completions.create(model="gpt-whatever", messages=USER, max_tokens=4)
    assert completion.model == "gpt-whatever" and completion.object == "chat.completion"
    assert completion.choices[0].message.content == "The mill is in Ost"
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].finish_reason == "stop"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model_extra["raggen"] == {
        "passages": PASSAGES,
        "index_version": "v7",
        "timings_ms": {"total": 1.0},
    }
    (req,) = service.requests
    # the last user message is the question; max_tokens -> max_new_tokens; service defaults fill the rest
    assert (req.question, req.max_new_tokens, req.top_k, req.num_beams, req.decoding) == (
        "Where is the mill?",
        4,
        3,
        2,
        "rag-token",
    )


def test_answer_route_keeps_its_contract():
    """/v1/answer answers from the same service: the chat-only fields it returns are not in its body."""
    r = _app(token=None).post("/v1/answer", json={"question": "Where is the mill?", "num_beams": 1})
    assert r.status_code == 200 and set(r.json()) == {"answer", "passages", "index_version", "timings_ms"}
    r = _app(token=None).post("/v1/answer", json={"question": "q", "num_beams": 3})
    assert r.status_code == 422 and r.json()["error"].startswith("num_beams:")


def test_raggen_options_and_text_parts():
    service = StreamingService()
    _client(_app(service)).chat.completions.create(
        model="m",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Where is "}, {"type": "text", "text": "the mill?"}]}
        ],
        max_completion_tokens=3,
        temperature=0.0,
        extra_body={"raggen": {"top_k": 5, "num_beams": 1, "decoding": "rag-sequence-fast"}},
    )
    (req,) = service.requests
    assert (req.question, req.max_new_tokens, req.top_k, req.num_beams, req.decoding) == (
        "Where is the mill?",
        3,
        5,
        1,
        "rag-sequence-fast",
    )


def test_stream_is_server_sent_chunks_ending_with_done():
    http = _app()
    chunks = list(_client(http).chat.completions.create(model="m", messages=USER, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The mill is in Ost"
    assert [c.choices[0].delta.content for c in chunks[1:-1]] == PIECES  # one chunk per piece
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.model_extra["raggen"] == {
        "passages": PASSAGES,
        "index_version": "v7",
    }
    assert last.choices[0].finish_reason == "length" and last.model_extra["raggen"]["timings_ms"]["total"] == 3.0
    assert all(c.object == "chat.completion.chunk" and c.model == "m" and c.id == first.id for c in chunks)
    # on the wire: SSE data lines, the last one [DONE]
    with http.stream(
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": "Bearer tok"},
        json={"model": "m", "messages": USER, "stream": True},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_auth_is_the_same_as_the_other_routes():
    http = _app()
    with pytest.raises(openai.AuthenticationError):
        _client(http, key="wrong").chat.completions.create(model="m", messages=USER)
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": USER})
    assert r.status_code == 401 and r.json()["error"].startswith("authorization")
    assert _app(token=None).post("/v1/chat/completions", json={"model": "m", "messages": USER}).status_code == 200


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "m", "messages": USER, "max_tokens": 9}, "max_tokens"),
        ({"model": "m", "messages": USER, "max_completion_tokens": 9}, "max_completion_tokens"),
        ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "system", "content": "hi"}]}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "  "}]}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "x" * 51}]}, "messages"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages",
        ),
        ({"messages": USER}, "model"),
        ({"model": "m", "messages": USER, "n": 2}, "n"),
        ({"model": "m", "messages": USER, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": USER, "raggen": {"top_k": 6}}, "raggen.top_k"),
        ({"model": "m", "messages": USER, "raggen": {"num_beams": 3}}, "raggen.num_beams"),
        ({"model": "m", "messages": USER, "raggen": {"decoding": "greedy"}}, "raggen.decoding"),
        ({"model": "m", "messages": USER, "raggen": {"topk": 2}}, "raggen.topk"),
    ],
)
def test_invalid_chat_requests_get_422_naming_the_field(body, field):
    r = _app(token=None).post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"].split(": ")[0].startswith(field), r.json()


def test_unknown_openai_fields_are_accepted():
    body = {
        "model": "m",
        "messages": USER,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n"],
        "user": "u1",
        "seed": 3,
        "presence_penalty": 0.0,
        "stream_options": {"include_usage": True},
    }
    assert _app(token=None).post("/v1/chat/completions", json=body).status_code == 200


def test_errors_before_and_during_a_stream():
    http = _app(StreamingService(fail_at="evidence"), token=None)
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": USER, "stream": True})
    assert r.status_code == 503 and r.json()["error"].startswith("index:")
    http = _app(StreamingService(fail_at="delta"), token=None)
    with pytest.raises(openai.APIError, match="internal error"):
        list(_client(http).chat.completions.create(model="m", messages=USER, stream=True))
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": USER, "stream": True})
    lines = [line for line in r.text.splitlines() if line]
    error = json.loads(lines[-2][6:])["error"]
    assert error["message"] == "internal error" and error["request_id"] and lines[-1] == "data: [DONE]"
    assert "decoder died" not in r.text  # the details are in the log under the request id
