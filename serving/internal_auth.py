"""The trust boundary behind the gateway: the internal token, development mode and secret redaction.

The gateway is the only public service. The classifier and the segmenter API trust a request only
when it carries the deployment's shared secret, ``BRAINSCAN_INTERNAL_TOKEN``, in the
``X-Brainscan-Internal-Token`` header (or as ``Authorization: Bearer <token>``, which Prometheus
sends); it is compared in constant time. Only the probes (``/healthz``, ``/readyz``) stay open:
compose health checks, the launcher and the gateway's ``/api/ready`` call them without
credentials, and they say nothing secret. A request without the token, or with a wrong one, gets a
401 JSON ``{"error": "unauthorized", "detail", "request_id"}``.

Outside development mode a missing secret stops the service at start-up with a message that names
the variable to set. ``BRAINSCAN_ENV=development`` (only for one user on one machine) lets a service
run without a token, with authentication off and a warning in its log.

Used by the services and the gateway (it imports FastAPI and pydantic-settings, which only they need):

* :class:`DeploymentSettings`: ``BRAINSCAN_ENV`` and ``BRAINSCAN_INTERNAL_TOKEN``, mixed into each
  service's settings; :func:`require_secret` is the start-up check.
* :func:`internal_auth_guard`: the middleware guard of :func:`serving.web.add_request_context`.
* :func:`redact_secrets` and :func:`with_password` for Redis URLs and messages that may hold one.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Collection
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from fastapi import Request
from fastapi.responses import Response
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings

from serving.web import CallNext, error_response

INTERNAL_TOKEN_HEADER = "X-Brainscan-Internal-Token"
TOKEN_VARIABLE = "BRAINSCAN_INTERNAL_TOKEN"
ENV_VARIABLE = "BRAINSCAN_ENV"
REDIS_PASSWORD_VARIABLE = "BRAINSCAN_REDIS_PASSWORD"
DEVELOPMENT = "development"
#: paths answered without the token: liveness and readiness probes
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
#: shorter secrets are refused outside development (``secrets.token_urlsafe(32)`` is 43 characters)
MIN_SECRET_LENGTH = 16
GENERATE_HINT = "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
#: the password of ``scheme://user:password@host`` (the user may be empty)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)[^&\s]+")

Guard = Callable[[Request, CallNext], Awaitable[Response]]


class MissingSecretError(RuntimeError):
    """A secret the deployment needs is not set (or too short); the service refuses to start."""


def require_secret(value: SecretStr | str | None, *, variable: str, service: str, development: bool,
                   purpose: str) -> str | None:
    """The secret's value, checked at start-up.

    Args:
        value: the configured secret (``None`` or empty: not set).
        variable: the environment variable that sets it, named in the error.
        service: who needs it, e.g. ``"the classifier"``.
        development: whether ``BRAINSCAN_ENV=development``.
        purpose: what the secret protects, said in the error.

    Returns:
        the secret, or ``None`` when it is not set in development mode.

    Raises:
        MissingSecretError: not set, or shorter than :data:`MIN_SECRET_LENGTH`, outside development.
    """
    secret = value.get_secret_value() if isinstance(value, SecretStr) else value
    if development:
        return secret or None
    if not secret:
        raise MissingSecretError(
            f"{variable} is not set: {service} refuses to start without it outside development mode "
            f"({purpose}). Set {variable} to a long random value ({GENERATE_HINT}), the same for every "
            f"service that shares it (with Docker Compose: in .env), or set {ENV_VARIABLE}={DEVELOPMENT} "
            "to run without it on a single-user machine.")
    if len(secret) < MIN_SECRET_LENGTH:
        raise MissingSecretError(f"{variable} is too short ({len(secret)} characters): use at least "
                                 f"{MIN_SECRET_LENGTH} random characters ({GENERATE_HINT}).")
    return secret


class DeploymentSettings(BaseSettings):
    """The settings every HTTP service shares: the deployment mode and the internal token.

    Mixed into the classifier's, the segmenter's and the gateway's settings. The variables have no
    service prefix: one ``.env`` value serves them all.
    """

    environment: Literal["development", "production"] = Field(
        default="production", validation_alias=AliasChoices(ENV_VARIABLE, "environment"),
        description="'development' lets a service run without secrets (authentication off)",
    )
    internal_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices(TOKEN_VARIABLE, "internal_token"),
        description="shared secret of the gateway and the internal services",
    )

    @property
    def development(self) -> bool:
        """Whether ``BRAINSCAN_ENV=development``."""
        return self.environment == DEVELOPMENT

    def require_internal_token(self, service: str) -> str | None:
        """The internal token (``None``: development mode without one, authentication off).

        Raises:
            MissingSecretError: no token outside development mode.
        """
        return require_secret(self.internal_token, variable=TOKEN_VARIABLE, service=service,
                              development=self.development,
                              purpose="it is the shared secret of the gateway and the internal services")


def presented_token(request: Request) -> str | None:
    """The token a request carries: ``X-Brainscan-Internal-Token``, else ``Authorization: Bearer``."""
    token = request.headers.get(INTERNAL_TOKEN_HEADER)
    if token is not None:
        return token
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def token_matches(presented: str | None, expected: str) -> bool:
    """Whether ``presented`` equals ``expected``, in time independent of where they differ."""
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def internal_auth_guard(logger: logging.Logger, *, token: str | None, service: str, inner: Guard,
                        open_paths: Collection[str] = PROBE_PATHS) -> Guard:
    """A ``guard`` for :func:`serving.web.add_request_context` that lets only the gateway in.

    Requests to ``open_paths`` pass as they are. Every other request needs ``token`` (see
    :func:`presented_token`); it is then marked ``request.state.internal_caller = True`` and handed
    to ``inner``. With ``token`` None (development mode without a token) every request passes, marked.

    Args:
        logger: where the start-up warning goes when authentication is off.
        token: the internal token, or None.
        service: the service's name, in messages.
        inner: the guard that answers authenticated requests (e.g. :func:`serving.web.upload_guard`).
        open_paths: the probe paths.
    """
    if token is None:
        logger.warning(f"internal authentication is OFF: {ENV_VARIABLE}={DEVELOPMENT} and no {TOKEN_VARIABLE}; "
                       f"anyone who can reach the {service} can use it")

    async def guard(request: Request, call_next: CallNext) -> Response:
        if request.url.path in open_paths:
            return await inner(request, call_next)
        if token is not None:
            presented = presented_token(request)
            if not token_matches(presented, token):
                problem = (f"no {INTERNAL_TOKEN_HEADER} header" if presented is None
                           else f"the token it carries does not match {TOKEN_VARIABLE}")
                return error_response(
                    request, 401, "unauthorized",
                    f"the {service} is an internal service: {problem}. Call it through the gateway, or send "
                    f"the deployment's {TOKEN_VARIABLE} in the {INTERNAL_TOKEN_HEADER} header",
                    headers={"WWW-Authenticate": INTERNAL_TOKEN_HEADER})
        request.state.internal_caller = True
        return await inner(request, call_next)

    return guard


def is_internal_caller(request: Request) -> bool:
    """Whether :func:`internal_auth_guard` authenticated this request."""
    return bool(getattr(request.state, "internal_caller", False))


# -- secrets in URLs and messages -----------------------------------------------------------------


def url_has_password(url: str) -> bool:
    """Whether ``url`` carries a password (``redis://:pw@host``) or a ``password=`` query parameter."""
    parts = urlsplit(url)
    return bool(parts.password) or "password=" in parts.query


def with_password(url: str, password: str | None) -> str:
    """``url`` with ``password`` in it, unless it is None or the URL has a password of its own.

    Example::

        >>> with_password("redis://redis:6379/0", "p@ss")
        'redis://:p%40ss@redis:6379/0'
    """
    if not password or url_has_password(url):
        return url
    parts = urlsplit(url)
    if parts.scheme == "unix":
        separator = "&" if parts.query else ""
        return urlunsplit(parts._replace(query=f"{parts.query}{separator}password={quote(password, safe='')}"))
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact_secrets(text: str, *secrets: str | None) -> str:
    """``text`` with URL passwords and each of ``secrets`` (raw or URL-quoted) written ``***``."""
    text = _QUERY_PASSWORD.sub(r"\g<head>***", _URL_PASSWORD.sub(r"\g<head>***@", text))
    for secret in secrets:
        if secret:
            for form in {secret, quote(secret, safe="")}:
                text = text.replace(form, "***")
    return text
