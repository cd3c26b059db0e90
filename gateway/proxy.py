"""Forwarding to the internal services: bounded uploads, one shared HTTP client, error mapping.

Uploads are read from the ASGI stream chunk by chunk and refused with 413 as soon as they pass
the limit, so a client can never make the gateway buffer more than ``max_upload_bytes``. The body
is then forwarded as-is (same multipart bytes, same ``Content-Type`` with its boundary): the
classifier parses and validates it, and its 4xx answers reach the client unchanged. Failures of
the service itself become 502/503/504 with a JSON body saying what the user can do.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
from fastapi import Request

from gateway.metrics import REQUEST_ID_HEADER, GatewayMetrics

logger = logging.getLogger("brainscan.gateway")


class GatewayError(Exception):
    """An error the gateway answers itself, as ``{"error": code, "detail": detail, "request_id"}``.

    Args:
        status: HTTP status of the answer.
        code: machine-readable error code (the page maps it to a plain-language message).
        detail: what went wrong and what to do, for a person.
        headers: extra response headers (e.g. ``Retry-After``).
    """

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def too_large(limit: int) -> GatewayError:
    """The 413 for an upload over ``limit`` bytes."""
    megabytes = limit / (1024 * 1024)
    # "Connection: close" makes the server drop the connection after the answer instead of
    # reading (and discarding) the rest of the upload to keep the connection alive.
    return GatewayError(413, "too_large",
                        f"The upload is larger than this server accepts ({megabytes:.1f} MB). "
                        "Upload a single JPG or PNG slice, or shrink the image first.",
                        headers={"Connection": "close"})


async def read_limited_body(request: Request, limit: int) -> bytes:
    """Read the request body, refusing it as soon as it exceeds ``limit`` bytes.

    A ``Content-Length`` over the limit is refused before any byte is read; a chunked body (no
    length) is counted while it streams, and reading stops at the first chunk past the limit.

    Args:
        request: the incoming request (its body not consumed yet).
        limit: the largest body accepted, in bytes (>= 1).

    Returns:
        The whole body.

    Raises:
        GatewayError: 413 ``too_large`` over the limit; 400 ``bad_request`` for a malformed
            ``Content-Length``.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1 byte, got {limit}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise GatewayError(400, "bad_request", f"The Content-Length header is not a number ({declared!r}). "
                                                   "Send the image with a standard HTTP client or browser.")
        if int(declared) > limit:
            raise too_large(limit)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class Upstream:
    """One internal service reached through the app's shared :class:`httpx.AsyncClient`.

    Args:
        name: service name used in messages and metrics (``"classifier"``).
        base_url: e.g. ``"http://127.0.0.1:8101"`` (no trailing slash).
        client: the shared client (created in the app's lifespan).
        metrics: where upstream failures are counted.
        start_hint: how an operator starts the service, quoted in 503 messages.
    """

    def __init__(self, name: str, base_url: str, client: httpx.AsyncClient, metrics: GatewayMetrics,
                 start_hint: str = "") -> None:
        if not base_url:
            raise ValueError(f"{name}: base_url must not be empty")
        self.name = name
        self.base_url = base_url
        self.client = client
        self.metrics = metrics
        self.start_hint = start_hint

    def _fail(self, status: int, code: str, detail: str, cause: Exception | str) -> GatewayError:
        self.metrics.upstream_errors.labels(self.name, code).inc()
        logger.warning("upstream error", extra={"service": self.name, "code": code, "cause": repr(cause)})
        return GatewayError(status, code, detail)

    async def request(self, method: str, path: str, *, request_id: str, content: bytes | None = None,
                      content_type: str | None = None, params: dict[str, str] | None = None,
                      timeout: httpx.Timeout | None = None) -> httpx.Response:
        """Send one request and return a response whose body is a JSON object.

        Returns:
            The upstream response for 2xx, 4xx and 503-with-JSON answers (the caller passes
            these through unchanged).

        Raises:
            GatewayError: 503 ``service_unavailable`` (connection refused or not opened in
                time), 504 ``upstream_timeout`` (no answer in time), 502 ``bad_gateway`` (broken
                connection, non-JSON body, or a 5xx other than a JSON 503).
        """
        headers = {REQUEST_ID_HEADER: request_id, "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        url = f"{self.base_url}{path}"
        extra = {} if timeout is None else {"timeout": timeout}
        try:
            response = await self.client.request(method, url, content=content, params=params,
                                                 headers=headers, **extra)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._fail(503, "service_unavailable",
                             f"The {self.name} service is not reachable right now. Try again in a minute; "
                             f"if this persists, the operator should start it{self.start_hint}.", exc) from exc
        except httpx.TimeoutException as exc:
            raise self._fail(504, "upstream_timeout",
                             f"The {self.name} service took too long to answer. Try again, or try a "
                             "smaller image; if it keeps happening the server is overloaded.", exc) from exc
        except httpx.TransportError as exc:
            raise self._fail(502, "bad_gateway",
                             f"The connection to the {self.name} service broke. Try again in a moment.",
                             exc) from exc
        body = _json_object(response)
        if body is None:
            raise self._fail(502, "bad_gateway",
                             f"The {self.name} service sent an answer the gateway cannot read "
                             f"(HTTP {response.status_code}). Try again; if it persists, report it to the operator.",
                             f"non-JSON body, status {response.status_code}")
        if response.status_code >= 500 and not (response.status_code == 503 and "error" in body):
            raise self._fail(502, "bad_gateway",
                             f"The {self.name} service failed on this request (HTTP {response.status_code}). "
                             "Try again; if it persists, report the request id to the operator.",
                             f"status {response.status_code}")
        return response


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The body as a dict when it is a JSON object, else None."""
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None
