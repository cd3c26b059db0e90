"""Prometheus metrics of the segmenter API, in a registry of their own.

Each app owns a :class:`ServiceMetrics` (one ``CollectorRegistry``), so several apps in one process
(tests) never collide in the global registry. ``GET /metrics`` serves :meth:`render`. The worker's
per-job metrics (outcomes, durations, inference time) are served by the worker itself on
``WORKER_METRICS_PORT`` (see :mod:`services.segmenter.worker_metrics`).

Metrics:
    segmenter_requests_total{route, method, status}     counter
    segmenter_request_duration_seconds{route}           histogram
    segmenter_jobs_submitted_total{model, source}       counter of accepted jobs (files / zip / 4d)
    segmenter_uploads_rejected_total{error}             counter of refused uploads by error code
    segmenter_intake_seconds{source}                    histogram: validating and storing an upload
    segmenter_upload_bytes                              histogram of accepted request bodies
    segmenter_jobs_cancelled_total                      counter
    segmenter_jobs_expired_total                        counter of jobs removed by the expiry sweep
    segmenter_enqueue_failures_total                    counter: broker unreachable at submission
    segmenter_queue_length                              gauge: jobs waiting in the broker's queue, read
                                                        at scrape time (absent while the broker is down)
    segmenter_broker_up                                 gauge: 1 when that read worked, else 0
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("services.segmenter")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: 1 MB to 1 GB: a gzipped BraTS case is ~10 MB, an uncompressed one ~150 MB
SIZE_BUCKETS = tuple(float(2**k) for k in range(20, 31))


class QueueLengthCollector(Collector):
    """Reads the queue length when scraped; a broker that is down gives ``broker_up 0``, not an error.

    Args:
        read_length: returns the number of waiting jobs; may raise anything when the broker is down.
    """

    def __init__(self, read_length: Callable[[], int]) -> None:
        self.read_length = read_length

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("segmenter_broker_up", "1 when the broker answered the queue-length read at scrape time")
        try:
            length = int(self.read_length())
        except Exception as exc:  # noqa: BLE001 - a scrape must never fail because Redis is down
            log.debug("queue length unavailable: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield GaugeMetricFamily("segmenter_queue_length", "jobs waiting in the segmentation queue (Redis LLEN)",
                                value=float(length))

    def describe(self) -> list:
        return []  # read only at scrape time: registering must not touch the broker


class ServiceMetrics:
    """The API's metrics, registered in a private :class:`~prometheus_client.CollectorRegistry`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("segmenter_requests", "HTTP requests by route template, method and status code",
                                ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram("segmenter_request_duration_seconds", "HTTP request latency by route template",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.jobs_submitted = Counter("segmenter_jobs_submitted", "jobs accepted and queued",
                                      ("model", "source"), registry=self.registry)
        self.uploads_rejected = Counter("segmenter_uploads_rejected", "uploads refused before queueing, by error",
                                        ("error",), registry=self.registry)
        self.intake = Histogram("segmenter_intake_seconds", "validating, normalising and storing one upload",
                                ("source",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upload_bytes = Histogram("segmenter_upload_bytes", "size of accepted request bodies",
                                      buckets=SIZE_BUCKETS, registry=self.registry)
        self.jobs_cancelled = Counter("segmenter_jobs_cancelled", "jobs cancelled by DELETE", registry=self.registry)
        self.jobs_expired = Counter("segmenter_jobs_expired", "jobs removed by the expiry sweep",
                                    registry=self.registry)
        self.enqueue_failures = Counter("segmenter_enqueue_failures", "submissions lost to an unreachable broker",
                                        registry=self.registry)

    def track_queue_length(self, read_length: Callable[[], int]) -> None:
        """Export ``segmenter_queue_length`` / ``segmenter_broker_up`` read by ``read_length`` at scrape time."""
        self.registry.register(QueueLengthCollector(read_length))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request and record its latency."""
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
