"""Who owns a segmentation job: an API key, or else a browser session the gateway issued.

Segmentation jobs live for hours and their files are medical images, so one user must never see
another's. The segmenter keeps an opaque owner id with every job and answers 404 to anyone else;
the gateway is the only place that decides that id, from what it has verified:

- with ``GATEWAY_API_KEYS`` set, the owner is ``"key:" + sha256(api_key)[:24]`` (the key itself
  never leaves the gateway; two keys are two owners);
- otherwise it is ``"session:" + <session id>``, where the session id is a random 32-byte
  value in the ``brainscan_session`` cookie that the gateway sets on the first response a
  browser gets (``HttpOnly`` so page scripts cannot read it, ``SameSite=Strict`` so other sites
  cannot ride on it, ``Secure`` over https). A request without a valid cookie gets a fresh one
  and proceeds as a new session. Command-line clients keep the cookie with ``curl -c/-b jar``.

``X-Brainscan-Owner`` is an internal header: the middleware removes it from every incoming
request, so a client can never choose whose jobs it sees.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.security import API_KEY_HEADER, ApiKeyDep
from gateway.settings import GatewaySettings

SESSION_COOKIE = "brainscan_session"
OWNER_HEADER = "X-Brainscan-Owner"
SESSION_BYTES = 32
# token_urlsafe(32) is 43 characters of the URL-safe base64 alphabet; anything else is not ours.
_SESSION_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}$")
_OWNER_HEADER_RAW = OWNER_HEADER.lower().encode("latin-1")


def new_session_id() -> str:
    """A fresh, unguessable browser session id (32 random bytes, URL-safe base64)."""
    return secrets.token_urlsafe(SESSION_BYTES)


def session_cookie(session_id: str, *, secure: bool) -> str:
    """The ``Set-Cookie`` value for ``session_id``.

    No ``Max-Age``: the cookie ends with the browser session, like the jobs it unlocks are meant to.
    """
    if not _SESSION_PATTERN.match(session_id):
        raise ValueError(f"session_id must be 43 URL-safe base64 characters, got {session_id!r}")
    attributes = [f"{SESSION_COOKIE}={session_id}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)


def key_owner(api_key: str) -> str:
    """The owner id of requests made with ``api_key``: ``"key:"`` + 24 hex digits of its SHA-256."""
    if not api_key:
        raise ValueError("api_key must not be empty")
    return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:24]


class BrowserSessionMiddleware:
    """Gives every HTTP request a browser session id and drops client-sent owner headers (pure ASGI).

    The id (from a valid ``brainscan_session`` cookie, else new) is stored in
    ``scope["state"]["session_id"]`` (``request.state.session_id``); when it is new, the response
    carries the cookie, whatever the route (the page, a probe or an API answer).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(name, value) for name, value in scope.get("headers", []) if name.lower() != _OWNER_HEADER_RAW]
        cookie_header = "; ".join(value.decode("latin-1") for name, value in headers if name.lower() == b"cookie")
        session_id = cookie_parser(cookie_header).get(SESSION_COOKIE, "") if cookie_header else ""
        issue = not _SESSION_PATTERN.match(session_id)
        if issue:
            session_id = new_session_id()
        scope = {**scope, "headers": headers}
        scope.setdefault("state", {})["session_id"] = session_id
        set_cookie = session_cookie(session_id, secure=scope.get("scheme") == "https").encode("latin-1")

        async def send_with_cookie(message: Message) -> None:
            if issue and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", set_cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def get_owner(request: Request, _: ApiKeyDep) -> str:
    """FastAPI dependency: the owner id of this request, to send to the segmenter.

    Runs after the API-key check, so with keys configured the key is known to be valid.

    Raises:
        RuntimeError: :class:`BrowserSessionMiddleware` is not installed (a wiring bug).
    """
    settings: GatewaySettings = request.app.state.settings
    if settings.api_keys_enabled:
        return key_owner(request.headers[API_KEY_HEADER])
    session_id = getattr(request.state, "session_id", None)
    if not session_id:
        raise RuntimeError("BrowserSessionMiddleware must wrap the app: no session id on the request")
    return f"session:{session_id}"


OwnerDep = Annotated[str, Depends(get_owner)]
