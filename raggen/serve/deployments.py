"""The serve graph on Ray Serve: Ingress (HTTP) -> Retriever -> [Reranker] -> Generator.

Each model deployment batches with ``@serve.batch`` where the model runs and does the work in a
thread, so its event loop stays free for health checks and for ``reconfigure``: an index swap
loads and verifies the new version beside the live one while requests keep being answered.

The per-stage work is plain functions (:func:`retrieve_batch`, :func:`rerank_batch`,
:func:`generate_batch`) and :class:`IndexHolder` is plain Python, so the same pipeline runs
in-process (benchmarks/serve.py compares the two). Resources, autoscaling and batch sizes are
set by :mod:`raggen.serve.app` with ``.options``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve

from raggen.errors import ConfigError, IndexIntegrityError, RaggenError
from raggen.decoding import rag_sequence_fast_generate, rag_sequence_thorough_generate, rag_token_generate
from raggen.devices import pick_device, pick_dtype
from raggen.index import ShardedIndex, load_version, read_latest
from raggen.models import Generator as GeneratorModel
from raggen.models import Reranker as RerankerModel
from raggen.models import TextEncoder, passage_text
from raggen.models.loading import fetch_model_dir
from raggen.serve.auth import DEFAULT_TOKEN_ENV, install_bearer_auth, token_from_env
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

# a child of Serve's logger, so swaps and refusals land in the replica's log file next to Serve's own
log = logging.getLogger("ray.serve").getChild(__name__)

Hit = dict[str, Any]  # {"id", "title", "text", "score"}: one passage of evidence
DECODERS: dict[str, Callable[..., Any]] = {
    "rag-token": rag_token_generate,
    "rag-sequence-fast": rag_sequence_fast_generate,
    "rag-sequence-thorough": rag_sequence_thorough_generate,
}


class NoIndexError(RaggenError):
    """The retriever has no verified index to serve from (yet)."""


# ---------------------------------------------------------------------------------- live index


@dataclass(frozen=True)
class LiveIndex:
    """One verified, loaded index version; replaced as a whole, never mutated."""

    root: str
    version: str
    index: Any  # raggen.index.ShardedIndex
    num_passages: int
    loaded_at: float


def load_live_index(root: str, version: str | None, *, s3: dict | None = None,
                    expect_dim: int | None = None) -> LiveIndex:
    """Load ``version`` (None: the one LATEST names) of the index at ``root``, every checksum verified.

    Raises IndexIntegrityError on a partial/corrupt version or one whose vectors the query encoder
    cannot search (dimension mismatch).
    """
    loaded = load_version(root, version, s3_options=s3)
    manifest = loaded.manifest
    dim = int(manifest.encoder.dim)
    if expect_dim is not None and dim != expect_dim:
        raise IndexIntegrityError(
            f"{root} version {manifest.version}: index vectors are {dim}-d but the query encoder gives {expect_dim}-d")
    index = ShardedIndex.from_version(loaded, use_actors=False)
    return LiveIndex(root=root, version=str(manifest.version), index=index,
                     num_passages=int(manifest.num_passages), loaded_at=time.time())


def read_latest_version(root: str, *, s3: dict | None = None) -> str | None:
    """The version name the ``LATEST`` pointer next to the versions holds (None: no pointer)."""
    return read_latest(root, s3_options=s3)


class IndexHolder:
    """Holds the live index; swaps in a verified new version atomically, refuses a bad one.

    A swap loads the new version while the old one keeps serving (readers take ``holder.live``
    once per batch), then replaces the reference. A refused version (IndexIntegrityError, or any
    load error) is logged and recorded in ``last_error``; the old version keeps serving. A replica
    that has no old version yet (one started later by the autoscaler, while the user_config still
    names the refused version) falls back to the version ``LATEST`` names, so the deployment can
    still scale; with no verifiable ``LATEST`` either the error propagates (the replica fails).
    """

    def __init__(self, loader: Callable[[str, str | None], LiveIndex], latest_reader: Callable[[str], str | None]):
        self._loader = loader
        self._latest_reader = latest_reader
        self._live: LiveIndex | None = None
        self._swap_lock = threading.Lock()
        self._refused: set[tuple[str, str]] = set()
        self._watch_stop: threading.Event | None = None
        self.requested: str | None = None
        self.last_error: str | None = None

    @property
    def live(self) -> LiveIndex:
        live = self._live
        if live is None:
            raise NoIndexError(f"no verified index loaded (last error: {self.last_error})")
        return live

    def swap_to(self, root: str, version: str | None, cancel: threading.Event | None = None) -> bool:
        """Load ``root``@``version`` beside the live index and swap; False (and last_error) if refused.

        ``cancel`` (a stopped watcher's event) drops a swap that waited for the lock while a newer
        ``configure`` ran, so a retired watcher never overrides the current user_config.
        """
        with self._swap_lock:
            if cancel is not None and cancel.is_set():
                return False
            self.requested = f"{root}@{version or 'LATEST'}"
            current = self._live
            if current is not None and version is not None and (current.root, current.version) == (root, version):
                return True
            try:
                new = self._loader(root, version)
            except Exception as exc:  # noqa: BLE001 - any failure to load must leave the old index serving
                self.last_error = f"refused {root} version {version or 'LATEST'}: {type(exc).__name__}: {exc}"
                if current is None:
                    raise
                log.error("index swap %s", self.last_error)
                return False
            self._live = new
            self.last_error = None
            log.info("index swap: now serving %s version %s (%d passages)", root, new.version, new.num_passages)
            return True

    def configure(self, index: str, version: str | None = None, watch_latest: bool = False,
                  watch_interval_s: float = 10.0) -> bool:
        """Apply a ``user_config``: load the named version (or LATEST), then (re)start the watcher."""
        self.stop_watching()
        ok = False
        try:
            if version is None:  # resolve LATEST now, so an unchanged pointer is a no-op
                version = self._latest_reader(index)
        except Exception as exc:  # noqa: BLE001 - an unreachable store is a refusal, not a crash
            self.refuse(f"refused {index} LATEST: cannot read it: {type(exc).__name__}: {exc}")
        else:
            try:
                ok = self.swap_to(index, version)
            except Exception:  # noqa: BLE001 - nothing live yet: try LATEST before failing the replica
                if version is None or not self._fall_back_to_latest(index, version):
                    raise
                ok = False
            if not ok and version is not None:
                self._refused.add((index, version))  # the watcher must not retry it every tick
        if watch_latest:
            self._start_watching(index, watch_interval_s)
        return ok

    def _fall_back_to_latest(self, index: str, refused: str) -> bool:
        """After ``refused`` failed with nothing live: serve LATEST if it is another, verifiable version."""
        reason = self.last_error
        try:
            latest = self._latest_reader(index)
            if latest is None or latest == refused or not self.swap_to(index, latest):
                return False
        except Exception as exc:  # noqa: BLE001 - the caller re-raises the original refusal
            log.error("index fallback to LATEST failed: %s", exc)
            self.last_error = reason
            return False
        self.last_error = f"{reason}; serving LATEST ({latest}) instead"
        log.error("index %s", self.last_error)
        return True

    def poll_latest(self, root: str, cancel: threading.Event | None = None) -> bool:
        """One watcher tick: swap to the version LATEST names if it is new and not refused before."""
        latest = self._latest_reader(root)
        if latest is None:
            return False
        current = self._live
        if current is not None and (current.root, current.version) == (root, latest):
            return False
        if (root, latest) in self._refused:
            return False
        ok = self.swap_to(root, latest, cancel)
        if not ok and not (cancel is not None and cancel.is_set()):
            self._refused.add((root, latest))
        return ok

    def _start_watching(self, root: str, interval_s: float) -> None:
        stop = threading.Event()
        self._watch_stop = stop

        def watch() -> None:
            while not stop.wait(interval_s):
                try:
                    self.poll_latest(root, stop)
                except Exception as exc:  # noqa: BLE001 - a flaky store must not kill the watcher
                    log.warning("index watcher: cannot follow %s/LATEST: %s", root, exc)

        threading.Thread(target=watch, name="raggen-index-watcher", daemon=True).start()

    def refuse(self, message: str) -> None:
        """Record a refused request (e.g. an invalid user_config); with nothing live it is fatal."""
        self.last_error = message
        if self._live is None:
            raise ConfigError(message)
        log.error("index swap refused: %s", message)

    def stop_watching(self) -> None:
        if self._watch_stop is not None:
            self._watch_stop.set()
            self._watch_stop = None

    def info(self) -> dict[str, Any]:
        live = self.live
        return IndexInfo(version=live.version, index=live.root, num_passages=live.num_passages,
                         loaded_at=live.loaded_at, requested=self.requested, last_error=self.last_error).model_dump()


class IndexUserConfig(BaseModel):
    """The Retriever's ``user_config``: which index to serve; changing it hot-swaps the index."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(min_length=1, description="root folder or s3:// prefix holding versions and LATEST")
    version: str | None = Field(None, description="a version name; None follows LATEST")
    watch_latest: bool = False
    watch_interval_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> "IndexUserConfig":
        if self.watch_latest and self.version is not None:
            raise ValueError("version pins one version while watch_latest follows LATEST: set only one")
        return self


# ---------------------------------------------------------------------------------- pipeline stages


def retrieve_batch(encoder: TextEncoder, live: LiveIndex, questions: list[str], top_ks: list[int]) -> list[list[Hit]]:
    """Top-k passages of each question from one index version (one encoder pass, one search)."""
    xq = encoder.encode(list(questions)).numpy()  # (b, d) float32
    result = live.index.search(xq, max(top_ks))
    out = []
    for i, k in enumerate(top_ks):
        hits = []
        for j in range(min(k, result.row_ids.shape[1])):
            if result.row_ids[i, j] < 0:  # the index holds fewer than k passages
                continue
            hits.append({"id": str(result.ids[i][j]), "title": str(result.titles[i][j]),
                         "text": str(result.texts[i][j]), "score": float(result.scores[i][j])})
        out.append(hits)
    return out


def _groups(keys: list[Any]) -> dict[Any, list[int]]:
    """Row numbers by key, so rows that can share one rectangular model pass run together."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for row, key in enumerate(keys):
        groups[key].append(row)
    return groups


@torch.no_grad()
def rerank_batch(reranker: RerankerModel, questions: list[str], candidates: list[list[Hit]],
                 top_ks: list[int]) -> list[list[Hit]]:
    """Re-score each question's candidates with the cross-encoder; keep its top_k by that score."""
    out: list[list[Hit]] = [[] for _ in questions]
    for c, rows in _groups([len(cands) for cands in candidates]).items():
        if c == 0:
            continue
        texts = [[passage_text(h["title"], h["text"]) for h in candidates[r]] for r in rows]
        scores = reranker.score([questions[r] for r in rows], texts)  # (n, c)
        for n, r in enumerate(rows):
            order = torch.argsort(scores[n], descending=True)[: top_ks[r]].tolist()
            out[r] = [{**candidates[r][j], "score": float(scores[n, j])} for j in order]
    return out


def decode_answers(generator: GeneratorModel, questions: list[str], hits: list[list[Hit]], decoding: str,
                   max_new_tokens: int, num_beams: int) -> list[str]:
    """One decoding over b questions with k passages each; p(z|x) = softmax of the passage scores."""
    if decoding not in DECODERS:
        raise ValueError(f"decoding must be one of {sorted(DECODERS)}, got {decoding!r}")
    texts = [[passage_text(h["title"], h["text"]) for h in row] for row in hits]
    scores = torch.tensor([[h["score"] for h in row] for row in hits], dtype=torch.float32)  # (b, k)
    doc_logprobs = torch.log_softmax(scores, dim=-1).to(generator.device)  # (b, k)
    encoded = generator.encode(list(questions), texts)
    kwargs: dict[str, Any] = dict(bos_id=generator.bos_id, eos_id=generator.eos_id, pad_id=generator.pad_id,
                                  max_new_tokens=max_new_tokens, num_beams=num_beams, num_return_sequences=1)
    if decoding == "rag-sequence-thorough" and generator.pad_id != generator.eos_id:
        # one teacher-forced pass per (candidate, passage); its EOS-based mask equals the decoder's
        # mask unless pad == eos (GPT-2), where the step-function fallback is used instead
        kwargs["sequence_logprob"] = lambda rows, targets, mask: generator.sequence_logprob(encoded, rows, targets)
    generated = DECODERS[decoding](generator.step_fn(encoded), doc_logprobs, **kwargs)
    return [generator.decode(tokens) for tokens in generated.best_tokens]


@torch.no_grad()
def generate_batch(generator: GeneratorModel, questions: list[str], hits: list[list[Hit]], decodings: list[str],
                   max_new_tokens: list[int], num_beams: int) -> list[str]:
    """Answers for a mixed batch: rows with the same (decoding, k, max_new_tokens) decode together."""
    answers = [""] * len(questions)  # a question with no passages (empty index) gets an empty answer
    keys = [(d, len(h), m) for d, h, m in zip(decodings, hits, max_new_tokens)]
    for (decoding, k, max_new), rows in _groups(keys).items():
        if k == 0:
            continue
        out = decode_answers(generator, [questions[r] for r in rows], [hits[r] for r in rows], decoding,
                             max_new, num_beams)
        for r, text in zip(rows, out):
            answers[r] = text
    return answers


# ---------------------------------------------------------------------------------- HTTP API


JSON_TYPES = ("application/json",)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


def _error(status: int, field: str, msg: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "detail": [{"type": kind, "loc": field.split("."), "msg": msg}], "error": f"{field}: {msg}"})


def build_http_api(service: Any, limits: RequestLimits, token: str | None) -> FastAPI:
    """The FastAPI app of the HTTP contract over ``service`` (``answer(req)``/``index_info()``, async).

    Every error is a JSON body ``{"detail": [...], "error": "field: reason"}`` naming the field:
    422 for invalid input (types by pydantic, bounds by :func:`check_limits`), 415 for a non-JSON
    body, 401 without the bearer token (when one is set), 503 while no index is loaded.
    """
    app = FastAPI(title="raggen", summary="retrieval-augmented answers with evidence")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        issues = jsonable_issues(exc.errors())
        return JSONResponse(status_code=422, content={"detail": issues, "error": summarize_issues(issues)})

    @app.middleware("http")
    async def _json_only(request: Request, call_next):
        if request.method == "POST" and not _is_json(request.headers.get("content-type")):
            return _error(415, "header.content-type", "must be application/json, got "
                          f"{request.headers.get('content-type') or 'none'!r}", "unsupported_media_type")
        return await call_next(request)

    install_bearer_auth(app, token)  # added last = outermost: 401 comes before any other check

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/index", response_model=IndexInfo)
    async def index() -> Any:
        try:
            return await service.index_info()
        except NoIndexError as exc:
            return _error(503, "index", str(exc), "no_index")

    @app.post("/v1/answer", response_model=AnswerResponse)
    async def answer(req: AnswerRequest) -> Any:
        issues = check_limits(req, limits)
        if issues:
            raise RequestValidationError(issues)
        try:
            return await service.answer(resolve_defaults(req, limits))
        except NoIndexError as exc:
            return _error(503, "index", str(exc), "no_index")
        except Exception as exc:  # noqa: BLE001 - one line to the client, the traceback to the log
            log.exception("answer failed")
            return _error(500, "server", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          "internal")

    return app


def jsonable_issues(errors: Any) -> list[dict[str, Any]]:
    """pydantic error dicts made JSON-safe (``ctx`` may hold exception objects, ``input`` bytes)."""
    out = []
    for issue in errors:
        issue = dict(issue)
        if "ctx" in issue:
            issue["ctx"] = {k: str(v) for k, v in issue["ctx"].items()}
        out.append(jsonable_encoder(issue, custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")}))
    return out


# ---------------------------------------------------------------------------------- deployments


def _set_batching(method: Any, max_batch_size: int, batch_wait_timeout_s: float) -> None:
    """``@serve.batch`` takes constants; the configured sizes are applied per replica here."""
    method.set_max_batch_size(max_batch_size)
    method.set_batch_wait_timeout_s(batch_wait_timeout_s)


@serve.deployment(name="Retriever", ray_actor_options={"num_cpus": 0.25})
class Retriever:
    """Query encoder + the live sharded index. ``user_config`` (:class:`IndexUserConfig`) picks the
    index; a new one hot-swaps it (``reconfigure``), a watcher can follow ``LATEST``."""

    def __init__(self, encoder: dict, s3: dict | None = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, device: str | None = None):
        dev = pick_device(device)
        encoder = {**encoder, "name_or_path": fetch_model_dir(encoder["name_or_path"], s3)}
        self.encoder = TextEncoder.from_pretrained(**encoder, device=dev).eval()
        self.holder = IndexHolder(
            loader=functools.partial(_load_for_swap, s3=s3, expect_dim=self.encoder.dim),
            latest_reader=functools.partial(read_latest_version, s3=s3),
        )
        _set_batching(self.retrieve, max_batch_size, batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict) -> None:
        try:
            cfg = IndexUserConfig.model_validate(user_config)
        except ValidationError as exc:
            self.holder.refuse(f"invalid Retriever user_config: {summarize_issues(exc.errors())}")
            return
        await asyncio.to_thread(self.holder.configure, **cfg.model_dump())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def retrieve(self, questions: list[str], top_ks: list[int]) -> list[dict]:
        live = self.holder.live  # one version for the whole batch, even if a swap lands meanwhile
        hits = await asyncio.to_thread(retrieve_batch, self.encoder, live, questions, top_ks)
        return [{"passages": h, "index_version": live.version} for h in hits]

    async def index_info(self) -> dict:
        return self.holder.info()

    def check_health(self) -> None:
        self.holder.live  # raises NoIndexError: a replica without a verified index is unhealthy

    def __del__(self) -> None:
        holder = getattr(self, "holder", None)
        if holder is not None:
            holder.stop_watching()


def _load_for_swap(root: str, version: str | None, *, s3: dict | None, expect_dim: int) -> LiveIndex:
    return load_live_index(root, version, s3=s3, expect_dim=expect_dim)


@serve.deployment(name="Reranker", ray_actor_options={"num_cpus": 0.25})
class Reranker:
    """Cross-encoder over the retrieved candidates; keeps the top_k by its score."""

    def __init__(self, path: str, max_length: int = 256, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, device: str | None = None, s3: dict | None = None):
        dev = pick_device(device)
        self.model = RerankerModel.from_pretrained(fetch_model_dir(path, s3), max_length=max_length, device=dev).eval()
        _set_batching(self.rerank, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def rerank(self, questions: list[str], candidates: list[list[Hit]], top_ks: list[int]) -> list[list[Hit]]:
        return await asyncio.to_thread(rerank_batch, self.model, questions, candidates, top_ks)

    def check_health(self) -> None:
        _check_device(self.model.device)


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0.25})
class Generator:
    """The reader; decodes with RAG-Token beam search or RAG-Sequence fast/thorough (raggen.decoding)."""

    def __init__(self, path: str, max_source_length: int = 192, max_target_length: int = 32, num_beams: int = 4,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, device: str | None = None,
                 s3: dict | None = None):
        dev = pick_device(device)
        self.model = GeneratorModel.from_pretrained(fetch_model_dir(path, s3), max_source_length=max_source_length,
                                                    max_target_length=max_target_length, device=dev,
                                                    dtype=pick_dtype(dev)).eval()
        self.num_beams = num_beams
        _set_batching(self.generate, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, questions: list[str], hits: list[list[Hit]], decodings: list[str],
                       max_new_tokens: list[int]) -> list[str]:
        return await asyncio.to_thread(generate_batch, self.model, questions, hits, decodings, max_new_tokens,
                                       self.num_beams)

    def check_health(self) -> None:
        _check_device(self.model.device)


def _check_device(device: torch.device) -> None:
    """A replica whose GPU vanished (driver reset, Xid error) must be replaced, not keep failing."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model device {device} is no longer available")


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Ingress:
    """HTTP front (FastAPI, built per replica with the configured limits and token): validates,
    then calls Retriever -> [Reranker] -> Generator through their handles."""

    def __init__(self, retriever: Any, generator: Any, reranker: Any = None, limits: dict | None = None,
                 api_token_env: str = DEFAULT_TOKEN_ENV, rerank_candidates: int = 20):
        self.retriever = retriever
        self.generator = generator
        self.reranker = reranker
        self.limits = RequestLimits(**(limits or {}))
        self.api_token_env = api_token_env
        self.rerank_candidates = rerank_candidates

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_api(self, self.limits, token_from_env(self.api_token_env))

    async def answer(self, req: AnswerRequest) -> dict:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        fetch = max(req.top_k, self.rerank_candidates) if self.reranker is not None else req.top_k
        retrieved = await self.retriever.retrieve.remote(req.question, fetch)
        hits = retrieved["passages"]
        timings["retrieve"] = _ms_since(start)
        if self.reranker is not None:
            t = time.perf_counter()
            hits = await self.reranker.rerank.remote(req.question, hits, req.top_k)
            timings["rerank"] = _ms_since(t)
        t = time.perf_counter()
        answer = await self.generator.generate.remote(req.question, hits, req.decoding, req.max_new_tokens)
        timings["generate"] = _ms_since(t)
        timings["total"] = _ms_since(start)
        return {"answer": answer, "passages": hits, "index_version": retrieved["index_version"],
                "timings_ms": timings}

    async def index_info(self) -> dict:
        return await self.retriever.index_info.remote()

    def check_health(self) -> None:
        return None  # stateless: it is healthy when it runs; the model deployments check themselves


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)
