"""Prometheus metrics of the serve graph, through ``ray.serve.metrics`` (Ray exports them per node).

Ray prefixes every application metric with ``ray_`` and adds ``_total`` to counters, and Serve adds
the ``deployment``, ``replica`` and ``application`` labels. What a scrape of a node's metrics port
(``ray start --metrics-export-port``; KubeRay: 8080) shows:

====================================================  ===========  =======================================
name (as scraped)                                     type         labels (besides Serve's)
====================================================  ===========  =======================================
``ray_raggen_http_requests_total``                    counter      ``route``, ``method``, ``status``
``ray_raggen_http_request_latency_ms``                histogram    ``route``
``ray_raggen_stage_latency_ms``                       histogram    ``stage``: retrieve / rerank / generate
``ray_raggen_batch_size``                             histogram    ``stage``: the ``@serve.batch`` function
``ray_raggen_index_version_info``                     gauge        ``version``: 1 live, 0 replaced
``ray_raggen_index_swaps_total``                      counter      (a live version replaced by another)
``ray_raggen_index_swaps_refused_total``              counter      (a version refused; the old one serves)
====================================================  ===========  =======================================

The recorders are created in each replica (``__init__``), where Serve's labels are known; the
plain-Python parts (the HTTP app, :class:`~raggen.serve.index_holder.IndexHolder`) take them as
optional hooks, so they run and test without Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raggen.serve.live_index import LiveIndex

PREFIX = "raggen_"
HTTP_REQUESTS = f"{PREFIX}http_requests"
HTTP_LATENCY = f"{PREFIX}http_request_latency_ms"
STAGE_LATENCY = f"{PREFIX}stage_latency_ms"
BATCH_SIZE = f"{PREFIX}batch_size"
INDEX_VERSION = f"{PREFIX}index_version_info"
INDEX_SWAPS = f"{PREFIX}index_swaps"
INDEX_SWAPS_REFUSED = f"{PREFIX}index_swaps_refused"
STAGES: tuple[str, ...] = ("retrieve", "rerank", "generate")

LATENCY_BUCKETS_MS = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0]
BATCH_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]


def _metrics() -> Any:
    from ray.serve import (
        metrics,  # imported here: the module stays importable without Ray's metrics agent
    )

    return metrics


class HttpMetrics:
    """Requests by route, method and status code, and their latency (the Ingress)."""

    def __init__(self) -> None:
        m = _metrics()
        self.requests = m.Counter(
            HTTP_REQUESTS,
            description="HTTP requests by route, method and status code",
            tag_keys=("route", "method", "status"),
        )
        self.latency = m.Histogram(
            HTTP_LATENCY,
            description="HTTP request latency (ms, until the last body byte)",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("route",),
        )

    def request(self, route: str, method: str, status: int, latency_ms: float) -> None:
        self.requests.inc(1, tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(latency_ms, tags={"route": route})


class StageMetrics:
    """Per-request latency of each stage as the Ingress sees it (queueing + batching + compute)."""

    def __init__(self) -> None:
        self.latency = _metrics().Histogram(
            STAGE_LATENCY,
            description="latency of a pipeline stage per request (ms)",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("stage",),
        )

    def observe(self, timings_ms: dict[str, float]) -> None:
        for stage in STAGES:
            if stage in timings_ms:
                self.latency.observe(float(timings_ms[stage]), tags={"stage": stage})


class BatchMetrics:
    """Sizes of the batches a ``@serve.batch`` function actually ran."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.sizes = _metrics().Histogram(
            BATCH_SIZE, description="requests per @serve.batch call", boundaries=BATCH_BUCKETS, tag_keys=("stage",)
        )

    def observe(self, size: int) -> None:
        self.sizes.observe(float(size), tags={"stage": self.stage})


class IndexMetrics:
    """The live index version as a labelled gauge, and swap / refusal counters (the Retriever).

    Hooks for :class:`~raggen.serve.index_holder.IndexHolder` (``on_swap``, ``on_refuse``).
    """

    def __init__(self) -> None:
        m = _metrics()
        self.version = m.Gauge(
            INDEX_VERSION,
            description="1 for the index version a replica serves, 0 for one it replaced",
            tag_keys=("version",),
        )
        self.swaps = m.Counter(INDEX_SWAPS, description="index versions swapped in over a live one")
        self.refused = m.Counter(INDEX_SWAPS_REFUSED, description="index versions refused (the old one kept serving)")

    def on_swap(self, old: LiveIndex | None, new: LiveIndex) -> None:
        if old is not None:
            self.version.set(0, tags={"version": old.version})
            self.swaps.inc(1, tags={})
        self.version.set(1, tags={"version": new.version})

    def on_refuse(self, message: str) -> None:
        self.refused.inc(1, tags={})
