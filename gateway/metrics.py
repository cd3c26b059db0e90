"""Gateway observability: request ids, Prometheus metrics and JSON logs.

Each app owns its :class:`prometheus_client.CollectorRegistry`, so several apps in one process
(tests) never share or double-register counters. One pure-ASGI middleware gives every request an
id (the client's ``X-Request-ID`` when it is well formed, else a new one), echoes it, and records
the route, status and latency of the request once it has been answered.
"""

from __future__ import annotations

import functools
import logging
import re
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import web
from serving.web import clean_request_id

LOGGER_NAME = "brainscan.gateway"


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of their own.

    Metrics:
        ``gateway_requests_total{route, method, status}``: answered requests.
        ``gateway_request_duration_seconds{route}``: latency histogram.
        ``gateway_upstream_errors_total{service, kind}``: refused connections, timeouts and bad
        answers of the internal services (``kind`` is the error code sent to the client).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gateway_requests_total", "HTTP requests answered by the gateway",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("gateway_request_duration_seconds", "Time to answer a request",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.upstream_errors = Counter("gateway_upstream_errors_total", "Failed calls to internal services",
                                       ["service", "kind"], registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for the ``/metrics`` route."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def configure_logging(level: str) -> logging.Logger:
    """Send the gateway logger's records to stderr as JSON lines (idempotent)."""
    formatter = web.JsonFormatter(time_key="time", time_format="%Y-%m-%dT%H:%M:%S%z", exc_key="exception")
    return web.configure_logging(logging.getLogger(LOGGER_NAME), level, propagate=False, formatter=formatter)


@functools.lru_cache(maxsize=256)
def _template_pattern(template: str) -> re.Pattern[str]:
    """``/a/{job_id}/b`` -> a regex matching ``/a/<one segment>/b``."""
    parts = re.split(r"\{[^/{}]+\}", template)
    return re.compile("^" + "[^/]+".join(re.escape(part) for part in parts) + "$")


def route_label(path: str, known_paths: frozenset[str]) -> str:
    """A low-cardinality route name: the route template a path matches, else ``unmatched``/``static``.

    A known path without parameters is its own label; one with parameters (``/api/v1/
    segmentations/{job_id}``) is labelled by its template, never by the id. Anything else is
    bucketed so that scanners cannot blow up the number of time series.
    """
    if path in known_paths:
        return path
    for template in known_paths:
        if "{" in template and _template_pattern(template).match(path):
            return template
    return "unmatched" if path.startswith("/api") else "static"


class RequestContextMiddleware:
    """Request id, access log and metrics for every HTTP request (pure ASGI, streams untouched).

    The id is stored in ``scope["state"]["request_id"]`` (``request.state.request_id`` in routes)
    and sent back in the ``X-Request-ID`` response header.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, logger: logging.Logger,
                 known_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.known_paths = known_paths
        self.metrics = metrics
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = clean_request_id(incoming)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = route_label(scope["path"], self.known_paths)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            self.logger.info("request", extra={
                "request_id": request_id, "method": scope["method"], "path": scope["path"],
                "route": route, "status": status, "duration_ms": round(elapsed * 1000, 1),
            })
