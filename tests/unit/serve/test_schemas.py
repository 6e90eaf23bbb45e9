"""The HTTP contract without Ray: request validation (types + config bounds), auth, error bodies,
the index holder's swap/refuse rules, and the app args / Serve config builders."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raggen.serve.auth import bearer_token, is_authorized
from raggen.serve.schemas import AnswerRequest, RequestLimits, check_limits, resolve_defaults, summarize_issues

LIMITS = RequestLimits(max_question_chars=50, default_top_k=3, max_top_k=5, max_new_tokens=8)


# ---------------------------------------------------------------------------------- schemas


def test_request_types_are_strict_and_fields_known():
    ok = AnswerRequest.model_validate({"question": "who?", "top_k": 2, "decoding": "rag-sequence-fast"})
    assert (ok.top_k, ok.decoding, ok.max_new_tokens) == (2, "rag-sequence-fast", None)
    for body, field in [
        ({"question": "who?", "top_k": "2"}, "top_k"),
        ({"question": "who?", "top_k": True}, "top_k"),
        ({"question": "who?", "top_k": 0}, "top_k"),
        ({"question": "who?", "max_new_tokens": 2.5}, "max_new_tokens"),
        ({"question": "   "}, "question"),
        ({"question": 7}, "question"),
        ({}, "question"),
        ({"question": "who?", "decoding": "greedy"}, "decoding"),
        ({"question": "who?", "topk": 3}, "topk"),
        ({"question": "who?", "num_beams": 0}, "num_beams"),
        ({"question": "who?", "num_beams": "1"}, "num_beams"),
    ]:
        with pytest.raises(ValidationError) as info:
            AnswerRequest.model_validate(body)
        assert [e["loc"][0] for e in info.value.errors()] == [field], body


def test_limits_name_each_broken_field_and_defaults_fill_in():
    req = AnswerRequest(question="x" * 51, top_k=6, max_new_tokens=9)
    issues = check_limits(req, LIMITS)
    assert [i["loc"] for i in issues] == [["body", "question"], ["body", "top_k"], ["body", "max_new_tokens"]]
    assert summarize_issues(issues).startswith("question: must be at most 50 characters")
    edge = AnswerRequest(question="x" * 50, top_k=5, max_new_tokens=8)
    assert check_limits(edge, LIMITS) == []
    filled = resolve_defaults(AnswerRequest(question="q"), LIMITS)
    assert (filled.top_k, filled.max_new_tokens, filled.num_beams) == (3, 8, LIMITS.max_num_beams)
    too_wide = check_limits(AnswerRequest(question="q", num_beams=LIMITS.max_num_beams + 1), LIMITS)
    assert [i["loc"] for i in too_wide] == [["body", "num_beams"]]
    with pytest.raises(ValueError, match="default_top_k"):
        RequestLimits(default_top_k=6, max_top_k=5)


def test_bearer_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    assert is_authorized("Bearer s3cret", "s3cret") and not is_authorized("Bearer s3cre", "s3cret")
