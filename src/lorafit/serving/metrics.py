"""GET /metrics: Prometheus counters and histograms, in a registry of the app's own (one per app)."""

from __future__ import annotations

from typing import Callable

LATENCY_BUCKETS = (.005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56, 5.12, 10.24)


class Metrics:
    def __init__(self, queue_depth: Callable[[], float]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lorafit_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("lorafit_request_duration_seconds", "time to answer a /predict request",
                                 buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.batch_size = Histogram("lorafit_batch_size", "texts the inference worker ran together",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.texts = Counter("lorafit_texts", "texts classified", registry=self.registry)
        self.model_texts = Counter("lorafit_model_texts", "texts classified, by adapter", ["model"],
                                   registry=self.registry)
        self.model_latency = Histogram("lorafit_model_request_duration_seconds",
                                       "time to answer a classification request, by adapter", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.models = Gauge("lorafit_model_loaded", "1 for each adapter served now", ["model"], registry=self.registry)
        depth = Gauge("lorafit_queue_depth", "requests admitted and not yet answered", registry=self.registry)
        depth.set_function(queue_depth)

    def served(self, names: list[str], removed: list[str] = ()) -> None:
        """Keep the per-adapter series in step with the adapters served."""
        for name in removed:
            self.models.remove(name)
        for name in names:
            self.models.labels(name).set(1)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
