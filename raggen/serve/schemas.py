"""The HTTP API's request and response bodies (DESIGN: HTTP API **contract**).

Types are checked by pydantic (strict: ``"5"`` is not a ``top_k``); the upper bounds come from the
serve config, so they are checked after parsing by :func:`check_limits`, which raises the same kind
of 422 error, naming the field, as a type error does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from raggen.names import DECODINGS  # noqa: F401 - re-exported for the serve package
from raggen.names import DecodingName as Decoding
from raggen.retrieval.settings import RetrievalMode


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; from the serve config (max_question_chars, max_top_k, ...)."""

    max_question_chars: int = 1000
    default_top_k: int = 5
    max_top_k: int = 20
    max_new_tokens: int = 32
    max_num_beams: int = 4  # the Generator's configured beam width: the default and the cap

    def __post_init__(self) -> None:
        for name in ("max_question_chars", "default_top_k", "max_top_k", "max_new_tokens", "max_num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k ({self.default_top_k}) must be <= max_top_k ({self.max_top_k})")


class AnswerRequest(BaseModel):
    """``POST /v1/answer``. Omitted ``top_k``/``max_new_tokens`` take the service's defaults."""

    model_config = ConfigDict(extra="forbid")

    question: StrictStr = Field(description="the question; 1..max_question_chars characters, not blank")
    top_k: StrictInt | None = Field(None, ge=1, description="passages to retrieve and read; 1..max_top_k")
    decoding: Decoding = "rag-token"
    max_new_tokens: StrictInt | None = Field(None, ge=1, description="answer length cap; 1..max_new_tokens")
    num_beams: StrictInt | None = Field(None, ge=1, description="beam width; 1 is greedy; 1..the service's num_beams")
    retrieval: RetrievalMode | None = Field(None, description="dense | sparse | hybrid; default: the service's")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value


class Passage(BaseModel):
    """One piece of evidence: the passage id in the index, its title and text, the retrieval score."""

    id: str
    title: str
    text: str
    score: float


class AnswerResponse(BaseModel):
    answer: str
    passages: list[Passage]
    index_version: str
    timings_ms: dict[str, float]


class IndexInfo(BaseModel):
    """``GET /v1/index``: the live version of the replica that answered, plus the last refused swap
    (if any) so a refusal is visible.

    ``latest`` is the version the ``LATEST`` pointer named when the replica last read it (while it
    follows LATEST); ``serving_fallback`` is true while the replica serves another version than the
    one it was asked for (LATEST or a pinned version) because that one failed verification or could
    not be loaded: it serves the newest version it could verify instead. ``index`` (the root URI),
    ``requested`` and ``last_error`` are shown only to callers allowed to see internals (a token is
    configured, or the service listens on loopback only); otherwise ``index`` is null.
    """

    version: str
    index: str | None
    num_passages: int
    loaded_at: float
    requested: str | None = None
    last_error: str | None = None
    latest: str | None = None
    serving_fallback: bool = False
    replica: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


def validation_issue(field: str, msg: str, value: Any, kind: str = "value_error") -> dict[str, Any]:
    """One entry in FastAPI's 422 ``detail`` list, located in the body like pydantic's own."""
    return {"type": kind, "loc": ["body", field], "msg": msg, "input": value}


def check_limits(req: AnswerRequest, limits: RequestLimits) -> list[dict[str, Any]]:
    """The config bounds a parsed request breaks, as 422 detail entries (empty when it is fine)."""
    issues = []
    if len(req.question) > limits.max_question_chars:
        issues.append(
            validation_issue(
                "question",
                f"must be at most {limits.max_question_chars} characters (got {len(req.question)})",
                f"{req.question[:40]}...",
                "string_too_long",
            )
        )
    if req.top_k is not None and req.top_k > limits.max_top_k:
        issues.append(validation_issue("top_k", f"must be <= {limits.max_top_k}", req.top_k, "less_than_equal"))
    if req.max_new_tokens is not None and req.max_new_tokens > limits.max_new_tokens:
        issues.append(
            validation_issue(
                "max_new_tokens", f"must be <= {limits.max_new_tokens}", req.max_new_tokens, "less_than_equal"
            )
        )
    if req.num_beams is not None and req.num_beams > limits.max_num_beams:
        issues.append(
            validation_issue("num_beams", f"must be <= {limits.max_num_beams}", req.num_beams, "less_than_equal")
        )
    return issues


def resolve_defaults(req: AnswerRequest, limits: RequestLimits) -> AnswerRequest:
    """Fill the omitted fields with the service's defaults (top_k: default_top_k; max_new_tokens and
    num_beams: the caps)."""
    return req.model_copy(
        update={
            "top_k": req.top_k if req.top_k is not None else limits.default_top_k,
            "max_new_tokens": req.max_new_tokens if req.max_new_tokens is not None else limits.max_new_tokens,
            "num_beams": req.num_beams if req.num_beams is not None else limits.max_num_beams,
        }
    )


def summarize_issues(issues: list[dict[str, Any]]) -> str:
    """``top_k: must be <= 20; question: Field required``: one line naming every bad field."""
    parts = []
    for issue in issues:
        # ("body", 15) is a JSON syntax error at char 15: the field to name is the body itself
        loc = [str(p) for p in issue.get("loc", ()) if p != "body" and not isinstance(p, int)] or ["body"]
        parts.append(f"{'.'.join(loc)}: {issue.get('msg', 'invalid')}")
    return "; ".join(parts)
