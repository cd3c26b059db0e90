"""Prometheus metrics of the classifier service, in a registry of their own.

Each app owns a :class:`ServiceMetrics` (one ``CollectorRegistry``), so several apps in one
process (tests) never collide in the global registry. ``GET /metrics`` serves :meth:`render`.

Metrics:
    classifier_requests_total{route, method, status}      counter
    classifier_request_duration_seconds{route}            histogram
    classifier_batch_size{model}                          histogram of requests per forward pass
    classifier_inference_seconds{model}                   histogram of batched forward passes
    classifier_explain_seconds{model, method}             histogram of per-request explanations
    classifier_models_loaded                              gauge
    classifier_image_tasks{state}                         gauge of decode/preprocess/heatmap tasks,
                                                          "queued" for a thread or "running"; both 0
                                                          when the service is idle
    classifier_image_tasks_dropped_total                  counter of image tasks removed from the
                                                          queue unstarted (their caller went away)
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: batch sizes are the padding buckets of the batcher, plus room for larger settings
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The service's metrics, registered in a private :class:`~prometheus_client.CollectorRegistry`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "classifier_requests", "HTTP requests by route template, method and status code",
            ("route", "method", "status"), registry=self.registry,
        )
        self.latency = Histogram(
            "classifier_request_duration_seconds", "HTTP request latency by route template",
            ("route",), buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "classifier_batch_size", "requests answered by one batched forward pass",
            ("model",), buckets=BATCH_SIZE_BUCKETS, registry=self.registry,
        )
        self.inference = Histogram(
            "classifier_inference_seconds", "duration of one batched forward pass",
            ("model",), buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.explain = Histogram(
            "classifier_explain_seconds", "duration of one explanation (heatmap and PNGs)",
            ("model", "method"), buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.models_loaded = Gauge(
            "classifier_models_loaded", "classification models loaded and served", registry=self.registry,
        )
        self.image_tasks = Gauge(
            "classifier_image_tasks", "image tasks (decode and preprocess, heatmap) waiting for or holding a thread",
            ("state",), registry=self.registry,
        )
        for state in ("queued", "running"):
            self.image_tasks.labels(state=state)
        self.image_tasks_dropped = Counter(
            "classifier_image_tasks_dropped", "image tasks removed from the queue unstarted: their caller went away",
            registry=self.registry,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request and record its latency."""
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        """Record one batched forward pass of ``size`` requests."""
        self.batch_size.labels(model=model).observe(size)
        self.inference.labels(model=model).observe(seconds)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
