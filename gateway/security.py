"""Gateway security: API keys, CORS allow-list and browser security headers.

Security model (the gateway is the only public service; the classifier and segmenter listen on
an internal network only):

- ``/api/v1/*`` needs an ``X-API-Key`` equal to one of ``GATEWAY_API_KEYS`` when that is set;
  keys are compared in constant time. ``/api/health``, ``/api/ready``, ``/metrics``, ``/docs``
  and the static page stay open so that probes work and the page can ask the user for a key.
- Wrong keys are throttled per client address (:class:`FailedKeyThrottle`): after
  ``GATEWAY_API_KEY_MAX_FAILURES`` wrong keys within ``GATEWAY_API_KEY_FAILURE_WINDOW_S``, that
  client's keys are answered 429 with ``Retry-After``, without being compared, until the oldest
  failure leaves the window; so guessing goes no faster than that many keys a window.
- Cross-origin browser calls are refused unless the origin is in ``GATEWAY_CORS_ORIGINS``.
- Every response carries ``X-Content-Type-Options: nosniff`` and a Content-Security-Policy that
  allows only same-origin scripts (ES modules), styles and connections, and ``data:`` images
  (the heatmaps arrive as data URLs).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.settings import GatewaySettings

API_KEY_HEADER = "X-API-Key"
#: clients whose failures are remembered at once; the longest idle are forgotten first
MAX_THROTTLED_CLIENTS = 10_000

logger = logging.getLogger("brainscan.gateway")

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# FastAPI's Swagger UI page loads its bundle from a CDN and starts it with an inline script.
DOCS_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")


class ApiKeyError(Exception):
    """The request lacks a valid ``X-API-Key`` (401), or its client sent too many wrong ones (429);
    the app answers it as JSON ``{"error": code, "detail": detail}`` with ``headers``."""

    def __init__(self, detail: str, *, status: int = 401, code: str = "unauthorized",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.headers = headers if headers is not None else {"WWW-Authenticate": API_KEY_HEADER}


class FailedKeyThrottle:
    """Wrong API keys per client, in a sliding window; thread-safe (the key check runs in a thread pool).

    Only wrong keys count: requests with a valid key never do, whatever their number. A client with
    ``max_failures`` wrong keys in the last ``window_s`` seconds waits until the oldest leaves the
    window; meanwhile its keys are not compared at all (a right key is refused too, or guessing
    would go on at full speed). Clients are told apart by :func:`client_id`.

    Args:
        max_failures: wrong keys a client may send per window; 0 turns throttling off.
        window_s: length of the window in seconds.
        max_clients: clients remembered at once (the longest idle are forgotten first), which
            bounds the memory a flood of addresses can take.
    """

    def __init__(self, max_failures: int, window_s: float, max_clients: int = MAX_THROTTLED_CLIENTS) -> None:
        if max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {max_failures}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may send a key again; 0 when it may now."""
        if self.max_failures == 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            failures = self._recent(client, now)
            if len(failures) < self.max_failures:
                return 0.0
            return max(failures[0] + self.window_s - now, 0.0)

    def record_failure(self, client: str) -> bool:
        """Count a wrong key from ``client``; returns whether that reached the limit."""
        if self.max_failures == 0:
            return False
        now = time.monotonic()
        with self._lock:
            failures = self._recent(client, now)
            failures.append(now)
            self._failures[client] = failures
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
            return len(failures) == self.max_failures

    def _recent(self, client: str, now: float) -> deque[float]:
        """The failures of ``client`` still in the window; drops older ones, and a client left with none."""
        failures = self._failures.get(client, deque())
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            self._failures.pop(client, None)
        return failures


def client_id(request: Request) -> str:
    """Who a request comes from, for throttling: the client's IP address (an IPv6 client by its /64,
    which one host or user usually holds whole). Behind a reverse proxy this is the proxy's address
    unless uvicorn trusts its ``X-Forwarded-For`` (``FORWARDED_ALLOW_IPS``)."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def key_matches(candidate: str, keys: Sequence[SecretStr | str]) -> bool:
    """Whether ``candidate`` equals one of ``keys`` (``SecretStr`` or ``str``), in constant time.

    Every key is compared, even after a match, so the time taken does not tell which key (or how
    many leading bytes) matched.
    """
    supplied = candidate.encode()
    matched = False
    for key in keys:
        secret = key.get_secret_value() if isinstance(key, SecretStr) else key
        matched |= hmac.compare_digest(supplied, secret.encode())
    return matched


def require_api_key(request: Request) -> None:
    """FastAPI dependency guarding ``/api/v1/*``.

    Raises:
        ApiKeyError: keys are configured and the header is missing or matches none (401), or
            this client sent too many wrong keys lately (429 with ``Retry-After``).
    """
    settings: GatewaySettings = request.app.state.settings
    if not settings.api_keys_enabled:
        return
    supplied = request.headers.get(API_KEY_HEADER)
    if not supplied:
        raise ApiKeyError(f"This gateway needs an API key. Send it in the {API_KEY_HEADER} header "
                          "(ask the operator of this server for one).")
    throttle: FailedKeyThrottle = request.app.state.key_throttle
    client = client_id(request)
    wait_s = throttle.retry_after(client)
    if wait_s > 0:
        seconds = max(1, math.ceil(wait_s))
        raise ApiKeyError(f"Too many wrong API keys from your address ({throttle.max_failures} within "
                          f"{throttle.window_s:g} s). Wait {seconds} s before trying again, and check the key "
                          "or ask the operator of this server for a new one.",
                          status=429, code="too_many_requests", headers={"Retry-After": str(seconds)})
    if not key_matches(supplied, settings.api_keys):
        if throttle.record_failure(client):
            logger.warning("wrong API keys throttled", extra={"client": client, "failures": throttle.max_failures,
                                                              "window_s": throttle.window_s})
        raise ApiKeyError(f"The API key in {API_KEY_HEADER} is not valid. Check it for typos or ask "
                          "the operator of this server for a new one.")


ApiKeyDep = Annotated[None, Depends(require_api_key)]


def add_cors(app: FastAPI, settings: GatewaySettings) -> None:
    """Allow browser calls from the configured origins only (none by default)."""
    if not settings.cors_origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Content-Type", API_KEY_HEADER, "X-Request-ID"],
        # No credentials: the session cookie is SameSite=Strict, so other sites use API keys.
        expose_headers=["X-Request-ID", "Location"],
        max_age=600,
    )


class SecurityHeadersMiddleware:
    """Adds nosniff, CSP, referrer and framing headers to every HTTP response (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_docs = scope["path"].startswith(DOCS_PATHS)
        policy = DOCS_CONTENT_SECURITY_POLICY if is_docs else CONTENT_SECURITY_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in (
                    (b"x-content-type-options", b"nosniff"),
                    (b"content-security-policy", policy.encode()),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ):
                    if name not in present:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
