"""Gateway security: API keys, CORS allow-list and browser security headers.

Security model (the gateway is the only public service; the classifier and segmenter listen on
an internal network only):

- ``/api/v1/*`` needs an ``X-API-Key`` equal to one of ``GATEWAY_API_KEYS`` when that is set;
  keys are compared in constant time. ``/api/health``, ``/api/ready``, ``/metrics``, ``/docs``
  and the static page stay open so that probes work and the page can ask the user for a key.
- Cross-origin browser calls are refused unless the origin is in ``GATEWAY_CORS_ORIGINS``.
- Every response carries ``X-Content-Type-Options: nosniff`` and a Content-Security-Policy that
  allows only same-origin scripts (ES modules), styles and connections, and ``data:`` images
  (the heatmaps arrive as data URLs).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.settings import GatewaySettings

API_KEY_HEADER = "X-API-Key"

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
    """The request lacks a valid ``X-API-Key`` (answered as 401 JSON by the app)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


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
        ApiKeyError: keys are configured and the header is missing or matches none.
    """
    settings: GatewaySettings = request.app.state.settings
    if not settings.api_keys_enabled:
        return
    supplied = request.headers.get(API_KEY_HEADER)
    if not supplied:
        raise ApiKeyError(f"This gateway needs an API key. Send it in the {API_KEY_HEADER} header "
                          "(ask the operator of this server for one).")
    if not key_matches(supplied, settings.api_keys):
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
