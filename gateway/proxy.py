"""Forwarding to the internal services: bounded uploads, one shared HTTP client, error mapping.

Uploads are read from the ASGI stream chunk by chunk and refused with 413 as soon as they pass
the limit, so a client can never make the gateway hold or forward more than the limit. A
classification (a few MB) is read whole and then forwarded; a segmentation case (hundreds of MB)
is streamed through to the segmenter chunk by chunk (:func:`stream_limited_body`). Either way the
body is forwarded as-is (same multipart bytes, same ``Content-Type`` with its boundary): the
service parses and validates it, and its 4xx answers reach the client unchanged. Failures of the
service itself become 502/503/504 with a JSON body saying what the user can do.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from collections.abc import AsyncIterator

import httpx
from fastapi import Request
from starlette.requests import ClientDisconnect

from serving.web import REQUEST_ID_HEADER
from gateway.metrics import GatewayMetrics

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


# Model names travel to the services as ?model=: a safe alphabet and length only.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
CLASSIFICATION_UPLOAD_HINT = "Upload a single JPG or PNG slice, or shrink the image first."


def too_large(limit: int, hint: str = CLASSIFICATION_UPLOAD_HINT) -> GatewayError:
    """The 413 for an upload over ``limit`` bytes; ``hint`` says what to upload instead."""
    megabytes = limit / (1024 * 1024)
    # "Connection: close" makes the server drop the connection after the answer instead of
    # reading (and discarding) the rest of the upload to keep the connection alive.
    return GatewayError(413, "too_large", f"The upload is larger than this server accepts ({megabytes:.1f} MB). {hint}",
                        headers={"Connection": "close"})


def check_declared_length(request: Request, limit: int, hint: str = CLASSIFICATION_UPLOAD_HINT) -> None:
    """Refuse a request whose ``Content-Length`` is malformed or over ``limit``, before reading it.

    Raises:
        GatewayError: 413 ``too_large``; 400 ``bad_request`` for a malformed header.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1 byte, got {limit}")
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise GatewayError(400, "bad_request", f"The Content-Length header is not a number ({declared!r}). "
                                               "Send the upload with a standard HTTP client or browser.")
    if int(declared) > limit:
        raise too_large(limit, hint)


async def stream_limited_body(request: Request, limit: int,
                              hint: str = CLASSIFICATION_UPLOAD_HINT) -> AsyncIterator[bytes]:
    """Yield the request body chunk by chunk, stopping with a 413 at the first chunk past ``limit``.

    Call :func:`check_declared_length` first: this generator only counts what arrives (the
    declared length can be absent, or a lie).

    Raises:
        GatewayError: 413 ``too_large`` over the limit; 400 ``upload_interrupted`` when the client
            goes away mid-upload.
    """
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large(limit, hint)
            if chunk:
                yield chunk
    except ClientDisconnect as exc:
        raise GatewayError(400, "upload_interrupted", "The upload was interrupted before it was complete. "
                                                      "Upload the files again.") from exc


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
    check_declared_length(request, limit)
    return b"".join([chunk async for chunk in stream_limited_body(request, limit)])


class Upstream:
    """One internal service reached through the app's shared :class:`httpx.AsyncClient`.

    Args:
        name: service name used in messages and metrics (``"classifier"``).
        base_url: e.g. ``"http://127.0.0.1:8101"`` (no trailing slash).
        client: the shared client (created in the app's lifespan).
        metrics: where upstream failures are counted.
        start_hint: how an operator starts the service, quoted in 503 messages.
        timeout_hint: what a user can try when the service is too slow, quoted in 504 messages.
    """

    def __init__(self, name: str, base_url: str, client: httpx.AsyncClient, metrics: GatewayMetrics,
                 start_hint: str = "", timeout_hint: str = ", or try a smaller image") -> None:
        if not base_url:
            raise ValueError(f"{name}: base_url must not be empty")
        self.name = name
        self.base_url = base_url
        self.client = client
        self.metrics = metrics
        self.start_hint = start_hint
        self.timeout_hint = timeout_hint

    def _fail(self, status: int, code: str, detail: str, cause: Exception | str) -> GatewayError:
        self.metrics.upstream_errors.labels(self.name, code).inc()
        logger.warning("upstream error", extra={"service": self.name, "code": code, "cause": repr(cause)})
        return GatewayError(status, code, detail)

    async def send(self, method: str, path: str, *, request_id: str,
                   content: bytes | AsyncIterator[bytes] | None = None, headers: dict[str, str] | None = None,
                   params: dict[str, str] | None = None, timeout: httpx.Timeout | None = None,
                   stream: bool = False) -> httpx.Response:
        """Send one request; transport failures become gateway errors, the answer is not checked.

        Args:
            method, path: e.g. ``"GET"``, ``"/v1/jobs/abc"`` (appended to ``base_url``).
            request_id: forwarded as ``X-Request-ID``.
            content: the body, whole or as an async iterator of chunks (streamed upstream).
            headers: extra request headers (they override the defaults).
            params: query parameters.
            timeout: overrides the client's timeout.
            stream: leave the response body unread (the caller must ``await response.aclose()``).

        Returns:
            The upstream response, whatever its status.

        Raises:
            GatewayError: 503 ``service_unavailable`` (connection refused or not opened in
                time), 504 ``upstream_timeout`` (no answer in time), 502 ``bad_gateway`` (broken
                connection). Errors raised by a ``content`` iterator (e.g. a 413) pass unchanged.
        """
        all_headers = {REQUEST_ID_HEADER: request_id, "Accept": "application/json", **(headers or {})}
        extra = {} if timeout is None else {"timeout": timeout}
        outgoing = self.client.build_request(method, f"{self.base_url}{path}", content=content, params=params,
                                             headers=all_headers, **extra)
        try:
            return await self.client.send(outgoing, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._fail(503, "service_unavailable",
                             f"The {self.name} service is not reachable right now. Try again in a minute; "
                             f"if this persists, the operator should start it{self.start_hint}.", exc) from exc
        except httpx.TimeoutException as exc:
            raise self._fail(504, "upstream_timeout",
                             f"The {self.name} service took too long to answer. Try again{self.timeout_hint}; "
                             "if it keeps happening the server is overloaded.", exc) from exc
        except httpx.TransportError as exc:
            raise self._fail(502, "bad_gateway",
                             f"The connection to the {self.name} service broke. Try again in a moment.",
                             exc) from exc

    def json_body(self, response: httpx.Response) -> dict[str, Any]:
        """The (read) body of a response the client may see, as a JSON object.

        Raises:
            GatewayError: 502 ``bad_gateway`` for a non-JSON body, a 401 (the service refused the
                gateway's internal token: a misconfiguration the client cannot fix) or a 5xx other
                than a JSON 503 (a 503 with an ``error`` code, e.g. ``model_unavailable``, passes through).
        """
        if response.status_code == 401:
            raise self._fail(502, "bad_gateway",
                             f"The gateway is not allowed to call the {self.name} service. Report this to the "
                             "operator: BRAINSCAN_INTERNAL_TOKEN must be the same for the gateway and the services.",
                             "internal token refused (401)")
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
        return body

    async def request(self, method: str, path: str, *, request_id: str, content: bytes | None = None,
                      content_type: str | None = None, params: dict[str, str] | None = None,
                      timeout: httpx.Timeout | None = None) -> httpx.Response:
        """Send one request and return a response whose body is a JSON object.

        Returns:
            The upstream response for 2xx, 4xx and 503-with-JSON answers (the caller passes
            these through unchanged).

        Raises:
            GatewayError: as :meth:`send` and :meth:`json_body`.
        """
        headers = {"Content-Type": content_type} if content_type else None
        response = await self.send(method, path, request_id=request_id, content=content, headers=headers,
                                   params=params, timeout=timeout)
        self.json_body(response)
        return response


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The body as a dict when it is a JSON object, else None."""
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None
