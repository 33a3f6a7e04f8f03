"""The service's Prometheus metrics, in a registry of their own (one per app)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """Requests by endpoint and status, latencies, queue wait, batch sizes, stage times, index."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mocoserve_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "mocoserve_request_seconds",
            "Request latency",
            ["endpoint"],
            buckets=SECONDS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mocoserve_queue_wait_seconds",
            "Time a request's images waited for the model",
            buckets=SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mocoserve_batch_size",
            "Images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.decode_seconds = Histogram(
            "mocoserve_decode_seconds", "Decode time per image", buckets=SECONDS, registry=r
        )
        self.embed_seconds = Histogram(
            "mocoserve_embed_seconds", "Model time per batch", buckets=SECONDS, registry=r
        )
        self.search_seconds = Histogram(
            "mocoserve_search_seconds", "Index search time per request", buckets=SECONDS, registry=r
        )
        self.queue_images = Gauge(
            "mocoserve_queue_images", "Images waiting for the model now", registry=r
        )
        self.index_items = Gauge("mocoserve_index_items", "Items in the loaded index", registry=r)
        self.index_version = Gauge(
            "mocoserve_index_version", "Saves of the loaded index (embed runs)", registry=r
        )
        self.reload_failures = Counter(
            "mocoserve_index_reload_failures",
            "Reloads that failed (the loaded index kept serving; /v1/info says why)",
            registry=r,
        )
        self.model = Info("mocoserve_model", "The loaded model package", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.embed_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
