"""The model deployments of the serve graph on Ray Serve: Retriever -> [Reranker] -> Generator.

The HTTP Ingress that calls them through their handles is :mod:`raggen.serve.ingress`.

Each model deployment batches with ``@serve.batch`` where the model runs and does the work in a
thread, so its event loop stays free for health checks and for ``reconfigure``: an index swap
loads and verifies the new version beside the live one while requests keep being answered.

The parts that need no Serve live beside this module and are re-exported here:
:mod:`~raggen.serve.live_index` (:class:`IndexUserConfig`, ...) with
:mod:`~raggen.serve.index_holder` (:class:`IndexHolder`),
:mod:`~raggen.serve.pipeline` (:func:`retrieve_batch`, :func:`rerank_batch`, :func:`generate_batch`),
:mod:`~raggen.serve.http_api` (:func:`build_http_api`) with :mod:`~raggen.serve.openai_api`, and
:mod:`~raggen.serve.metrics`. Resources, autoscaling and batch sizes are set by
:mod:`raggen.serve.app` with ``.options``.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator
from typing import Any

import torch
from pydantic import ValidationError
from ray import serve

from raggen.devices import pick_device, pick_dtype
from raggen.errors import RaggenError
from raggen.index import SearchSettings
from raggen.index.shard_server import rss_bytes
from raggen.models import Generator as GeneratorModel
from raggen.models import Reranker as RerankerModel
from raggen.models import TextEncoder
from raggen.models.loading import fetch_model_dir
from raggen.retrieval import RetrievalSettings
from raggen.retrieval.search import Hit
from raggen.serve.http_api import build_http_api, jsonable_issues
from raggen.serve.index_holder import IndexHolder
from raggen.serve.live_index import (
    IndexUserConfig,
    LiveIndex,
    NoIndexError,
    load_for_swap,
    load_live_index,
    read_latest_version,
    versions_newest_first,
)
from raggen.serve.metrics import BatchMetrics, IndexMetrics
from raggen.serve.pipeline import (
    TextDeltas,
    decode_answers,
    decode_tokens,
    generate_batch,
    generate_outputs,
    generation_of,
    rerank_batch,
    retrieve_batch,
    streams_while_decoding,
)
from raggen.serve.resilience import actor_lost
from raggen.serve.schemas import summarize_issues

__all__ = [
    "Generator",
    "Hit",
    "IndexHolder",
    "IndexUserConfig",
    "LiveIndex",
    "NoIndexError",
    "Reranker",
    "Retriever",
    "build_http_api",
    "decode_answers",
    "generate_batch",
    "jsonable_issues",
    "load_live_index",
    "read_latest_version",
    "rerank_batch",
    "retrieve_batch",
]


def _set_batching(method: Any, max_batch_size: int, batch_wait_timeout_s: float) -> None:
    """``@serve.batch`` takes constants; the configured sizes are applied per replica here."""
    method.set_max_batch_size(max_batch_size)
    method.set_batch_wait_timeout_s(batch_wait_timeout_s)


@serve.deployment(name="Retriever", ray_actor_options={"num_cpus": 0.25})
class Retriever:
    """Query encoder + the live sharded index. ``user_config`` (:class:`IndexUserConfig`) picks the
    index; a new one hot-swaps it (``reconfigure``), a watcher can follow ``LATEST``.

    ``search`` (``index.search``, ``raggen.index.SearchSettings`` as a dict; None: local) says where
    the shards live: in this replica, or in shard actors that every replica of the version shares
    (one group per version, lent by the cluster's ``ShardGroupRegistry``; see
    :mod:`raggen.serve.live_index`). The query encoder always runs here."""

    def __init__(
        self,
        encoder: dict,
        s3: dict | None = None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        device: str | None = None,
        retry_attempts: int = 3,
        search: dict | None = None,
        retrieval: dict | None = None,
    ):
        dev = pick_device(device)
        # the service's retrieval mode and fusion (``retrieval``); a request may ask for another mode
        self.retrieval = RetrievalSettings.model_validate(retrieval or {})
        named = (encoder["name_or_path"], encoder["pooling"])  # as a manifest records it (args: a full EncoderSpec)
        encoder = {**encoder, "name_or_path": fetch_model_dir(encoder["name_or_path"], s3)}
        self.encoder = TextEncoder.from_pretrained(**encoder, device=dev).eval()
        self.index_metrics = IndexMetrics()
        self.batch_metrics = BatchMetrics("retrieve")
        settings = SearchSettings.model_validate(search) if search is not None else None
        self.holder = IndexHolder(
            loader=functools.partial(
                load_for_swap, s3=s3, expect_dim=self.encoder.dim, expect_encoder=named, settings=settings
            ),
            latest_reader=functools.partial(read_latest_version, s3=s3),
            versions_reader=functools.partial(versions_newest_first, s3=s3),
            on_swap=self.index_metrics.on_swap,
            on_refuse=self.index_metrics.on_refuse,
            retry_attempts=retry_attempts,
            replica=_replica_name(),
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
    async def retrieve(self, questions: list[str], top_ks: list[int], modes: list[str | None]) -> list[dict]:
        """``modes``: each request's dense | sparse | hybrid (None: the service's). A mode the live
        version cannot serve (no BM25 index) answers that request ``{"error": ...}``."""
        self.batch_metrics.observe(len(questions))
        wanted = [m or self.retrieval.mode for m in modes]
        for attempt in range(2):
            # one version for the whole batch, pinned: a swap meanwhile closes it only after this batch
            with self.holder.use() as live:
                errors = {m: _mode_error(live.index, m) for m in set(wanted)}
                ok = [i for i, m in enumerate(wanted) if errors[m] is None]
                try:
                    hits = (
                        await asyncio.to_thread(
                            retrieve_batch,
                            self.encoder,
                            live,
                            [questions[i] for i in ok],
                            [top_ks[i] for i in ok],
                            [wanted[i] for i in ok],
                            self.retrieval,
                        )
                        if ok
                        else []
                    )
                    break
                except Exception as exc:
                    # shard actors gone for good (a restarting one only delays the search): borrow
                    # a new group for the same version and search once more
                    if attempt or live.backend != "actors" or not actor_lost(exc):
                        raise
            await asyncio.to_thread(self.holder.reopen, live)
        found = dict(zip(ok, hits))
        return [
            {"passages": found[i], "index_version": live.version}
            if i in found
            else {"error": errors[wanted[i]], "index_version": live.version}
            for i in range(len(questions))
        ]

    async def index_info(self) -> dict:
        return self.holder.info()

    async def replica_info(self) -> dict:
        """This replica's process and where its index is searched (for operators and tests)."""
        live = self.holder.live
        group = getattr(live.index, "actor_group", None)
        return {
            "pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "version": live.version,
            "backend": live.backend,
            "actor_group": None if group is None else group.name,
            "in_flight": self.holder.in_flight(),
        }

    def check_health(self) -> None:
        _ = self.holder.live  # raises NoIndexError: a replica without a verified index is unhealthy

    def __del__(self) -> None:
        holder = getattr(self, "holder", None)
        if holder is not None:
            holder.close()  # stops the watcher, gives a shared shard actor group back


@serve.deployment(name="Reranker", ray_actor_options={"num_cpus": 0.25})
class Reranker:
    """Cross-encoder over the retrieved candidates; keeps the top_k by its score."""

    def __init__(
        self,
        path: str,
        max_length: int = 256,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        device: str | None = None,
        s3: dict | None = None,
    ):
        dev = pick_device(device)
        self.model = RerankerModel.from_pretrained(fetch_model_dir(path, s3), max_length=max_length, device=dev).eval()
        self.batch_metrics = BatchMetrics("rerank")
        _set_batching(self.rerank, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def rerank(self, questions: list[str], candidates: list[list[Hit]], top_ks: list[int]) -> list[list[Hit]]:
        self.batch_metrics.observe(len(questions))
        return await asyncio.to_thread(rerank_batch, self.model, questions, candidates, top_ks)

    def check_health(self) -> None:
        _check_device(self.model.device)


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0.25})
class Generator:
    """The reader; decodes with RAG-Token beam search or RAG-Sequence fast/thorough (raggen.decoding).

    ``generate`` (batched) returns the whole answer; ``generate_stream`` (one request, called with
    ``stream=True``) yields ``{"delta": text}`` pieces as they are decoded, then the
    :class:`~raggen.serve.pipeline.Generation` summary.
    """

    def __init__(
        self,
        path: str,
        max_source_length: int = 192,
        max_target_length: int = 32,
        num_beams: int = 4,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        device: str | None = None,
        s3: dict | None = None,
    ):
        dev = pick_device(device)
        self.model = GeneratorModel.from_pretrained(
            fetch_model_dir(path, s3),
            max_source_length=max_source_length,
            max_target_length=max_target_length,
            device=dev,
            dtype=pick_dtype(dev),
        ).eval()
        self.num_beams = num_beams
        self.batch_metrics = BatchMetrics("generate")
        _set_batching(self.generate, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(
        self,
        questions: list[str],
        hits: list[list[Hit]],
        decodings: list[str],
        max_new_tokens: list[int],
        num_beams: list[int | None],
    ) -> list[dict]:
        self.batch_metrics.observe(len(questions))
        beams = [nb or self.num_beams for nb in num_beams]
        return await asyncio.to_thread(generate_outputs, self.model, questions, hits, decodings, max_new_tokens, beams)

    async def generate_stream(
        self, question: str, hits: list[Hit], decoding: str, max_new_tokens: int, num_beams: int | None = None
    ) -> AsyncIterator[dict]:
        num_beams = num_beams or self.num_beams
        if not hits:  # an empty index: an empty answer, as generate gives
            yield {"text": "", "completion_tokens": 0, "finish_reason": "stop"}
            return
        loop = asyncio.get_running_loop()
        prefixes: asyncio.Queue[list[int] | None] = asyncio.Queue()

        def push(prefix: list[int]) -> None:  # decoder thread -> this event loop, in order
            loop.call_soon_threadsafe(prefixes.put_nowait, prefix)

        on_prefix = push if streams_while_decoding(decoding, num_beams) else None
        decoded = loop.run_in_executor(
            None,
            functools.partial(
                decode_tokens, self.model, [question], [hits], decoding, max_new_tokens, num_beams, on_prefix
            ),
        )
        decoded.add_done_callback(lambda _: prefixes.put_nowait(None))
        deltas = TextDeltas(self.model.decode)
        while (prefix := await prefixes.get()) is not None:
            if piece := deltas.update(prefix):
                yield {"delta": piece}
        tokens = (await decoded)[0]
        generation = generation_of(self.model, tokens, max_new_tokens)
        for piece in deltas.pieces(tokens):  # what the steps have not shown: the last token, or all of a beam search
            yield {"delta": piece}
        if rest := deltas.finish(generation["text"]):
            yield {"delta": rest}
        yield dict(generation)

    def check_health(self) -> None:
        _check_device(self.model.device)


def _check_device(device: torch.device) -> None:
    """A replica whose GPU vanished (driver reset, Xid error) must be replaced, not keep failing."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model device {device} is no longer available")


def _mode_error(index: Any, mode: str) -> str | None:
    """Why ``index`` (a live index) cannot serve retrieval ``mode``, or None when it can."""
    check = getattr(index, "check_mode", None)
    if check is None:  # a plain dense index
        return None if mode == "dense" else f"{mode!r} needs a sparse index; this service searches dense only"
    try:
        check(mode)
    except RaggenError as exc:
        return str(exc).removeprefix("retrieval.mode: ")
    return None


def _replica_name() -> str | None:
    """This replica's id (``Retriever#abc123``) for ``/v1/index``; None outside a replica."""
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # noqa: BLE001 - outside Serve (tests construct the class directly)
        return None
