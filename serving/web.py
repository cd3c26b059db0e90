"""Plumbing shared by the HTTP services: JSON logs, request ids and JSON error bodies.

Used by the classifier service, the segmenter API (and its worker, for logging) and the gateway.
TensorFlow-free; it imports FastAPI/Starlette, which only the services need, so nothing in the
library proper (``brainscan.*`` outside this module) imports it.

* :func:`configure_logging` sends one logger's records to stderr as JSON lines (:class:`JsonFormatter`).
* :func:`clean_request_id` keeps a client's ``X-Request-ID`` when it is a plain token, else makes one.
* :func:`add_request_context` is the services' middleware: request id in ``request.state.request_id``,
  echoed in the ``X-Request-ID`` header, one JSON access-log line per request.
* :func:`error_response` builds the ``{"error", "detail", "request_id"}`` body every failure uses;
  :func:`install_error_handlers` maps ``BrainscanError`` / request validation / Starlette HTTP errors to it.
* :func:`unless_client_leaves` stops a route's work when its caller disconnects;
  :func:`refuse_repeated_form_fields` refuses (422) a form that sends a field twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from brainscan.errors import BrainscanError, InputTooLargeError, InvalidInputError

REQUEST_ID_HEADER = "X-Request-ID"
#: client request ids are echoed into logs and headers, so only plain tokens are accepted
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: ``error`` codes of the Starlette HTTP errors (others are ``http_<status>``)
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}

CallNext = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


class ClientGoneError(BrainscanError):
    """The caller closed the connection before the answer was ready; its work was stopped.

    Nobody reads the answer; the status (499, "client closed request", as nginx logs it) is
    for the access log and the request metrics.
    """

    code = "client_gone"
    http_status = 499


# -- logging ------------------------------------------------------------------------------------

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra=`` field.

    Args:
        time_key: the name of the time field; ``time_format`` (``strftime``) formats it, else ISO 8601
            UTC with milliseconds.
        exc_key: the name of the traceback field.
    """

    def __init__(self, *, time_key: str = "ts", time_format: str | None = None, exc_key: str = "exc_info") -> None:
        super().__init__()
        self.time_key = time_key
        self.time_format = time_format
        self.exc_key = exc_key

    def format(self, record: logging.LogRecord) -> str:
        if self.time_format is None:
            when = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        else:
            when = self.formatTime(record, self.time_format)
        payload: dict[str, Any] = {
            self.time_key: when,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")})
        if record.exc_info:
            payload[self.exc_key] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (test runners swap it), like ``logging.lastResort``."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(logger: logging.Logger, level: str, *, propagate: bool | None = None,
                      formatter: logging.Formatter | None = None) -> logging.Logger:
    """Send ``logger``'s records to stderr as JSON lines (once per process and logger).

    Args:
        logger: the logger to configure.
        level: its level name.
        propagate: when not None, set ``logger.propagate`` (False keeps records away from a root
            logger that another library formats).
        formatter: default :class:`JsonFormatter`.

    Returns:
        ``logger``.
    """
    logger.setLevel(level)
    if propagate is not None:
        logger.propagate = propagate
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(formatter or JsonFormatter())
        logger.addHandler(handler)
    return logger


# -- request ids --------------------------------------------------------------------------------


def clean_request_id(value: str | None) -> str:
    """The client's request id when it is safe to log and forward, else a fresh uuid4 hex."""
    if value and REQUEST_ID_PATTERN.match(value):
        return value
    return uuid.uuid4().hex


def add_request_context(app: FastAPI, logger: logging.Logger, *,
                        observe: Callable[[str, str, int, float], None],
                        guard: Callable[[Request, CallNext], Awaitable[Response]]) -> None:
    """Install the services' HTTP middleware.

    Sets ``request.state.request_id`` (see :func:`clean_request_id`) and ``request.state.log`` (a
    dict routes fill with extra access-log fields), answers through ``guard(request, call_next)``,
    calls ``observe(route_template, method, status, seconds)``, echoes the id in ``X-Request-ID``
    and logs one ``"request"`` line.
    """

    @app.middleware("http")
    async def request_context(request: Request, call_next: CallNext) -> Response:
        request.state.request_id = clean_request_id(request.headers.get(REQUEST_ID_HEADER, ""))
        request.state.log = {}
        started = time.perf_counter()
        response = await guard(request, call_next)
        seconds = time.perf_counter() - started
        template = getattr(request.scope.get("route"), "path", "unmatched")
        observe(template, request.method, response.status_code, seconds)
        response.headers[REQUEST_ID_HEADER] = request.state.request_id
        logger.info("request", extra={
            "request_id": request.state.request_id, "method": request.method, "path": request.url.path,
            "route": template, "status": response.status_code, "duration_ms": round(seconds * 1000.0, 2),
            **request.state.log,
        })
        return response


def upload_guard(logger: logging.Logger, *, path: str, max_upload_bytes: int, overhead: int, service: str,
                 method: str = "POST", on_reject: Callable[[], None] | None = None
                 ) -> Callable[[Request, CallNext], Awaitable[Response]]:
    """The ``guard`` of :func:`add_request_context` that the services share.

    A ``method`` request to ``path`` whose ``Content-Length`` exceeds ``max_upload_bytes +
    overhead`` (room for the multipart framing) gets a 413 before its body is read; smaller bodies,
    and bodies without a length, are capped while they are parsed. Any exception that escapes a
    route is logged with the request id and answered with a JSON 500 naming ``service``, so the
    client never sees a bare stack trace and the service stays up. ``on_reject`` is called for
    each 413 (metrics).
    """

    async def guard(request: Request, call_next: CallNext) -> Response:
        length = request.headers.get("content-length", "")
        if request.method == method and request.url.path == path and length.isdigit() \
                and int(length) > max_upload_bytes + overhead:
            if on_reject is not None:
                on_reject()
            return error_response(request, 413, InputTooLargeError.code,
                                  f"the request body is {length} bytes; uploads are limited to "
                                  f"{max_upload_bytes} bytes")
        try:
            return await call_next(request)
        except Exception:
            logger.exception("unhandled error", extra={"request_id": request.state.request_id})
            return error_response(request, 500, "internal_error",
                                  f"the {service} failed unexpectedly; the error is logged under this request_id")

    return guard


# -- callers that leave ----------------------------------------------------------------------------


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` and cancel it as soon as the client disconnects.

    A route runs to the end even when its caller has gone (a proxy that timed out, a closed
    tab), so a burst of expensive requests keeps the service busy long after anyone waits for
    the answers. Call this once the request body has been read: the only message left on the
    ASGI channel is then ``http.disconnect``, which this waits for alongside ``work``.

    Args:
        request: the request whose connection is watched (its body already read).
        work: a coroutine or future; cancelled when the client leaves first.

    Returns:
        What ``work`` returns (its exceptions propagate).

    Raises:
        ClientGoneError: (499) the client disconnected before ``work`` was done.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    if watcher.exception() is not None:  # the connection cannot be watched: wait for the work
        return await task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody wants the result now
        await task
    raise ClientGoneError("the client closed the connection before the answer was ready; the work was stopped")


def refuse_repeated_form_fields(form: Any, hint: str = "send each field once") -> None:
    """Refuse a form that sends a field more than once: the route would silently keep the last one.

    Args:
        form: the parsed form (``await request.form()``).
        hint: what the client should send instead, appended to the message.

    Raises:
        InvalidInputError: (422 ``duplicate_field``, as the segmenter answers) naming the fields.
    """
    counts = Counter(key for key, _ in form.multi_items())
    repeated = sorted(key for key, count in counts.items() if count > 1)
    if repeated:
        raise InvalidInputError(f"field(s) {repeated} sent more than once; {hint}", code="duplicate_field")


# -- errors -------------------------------------------------------------------------------------


def error_response(request: Request, status: int, code: str, detail: str, *,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The JSON error body every failure uses: ``{"error", "detail", "request_id", **extra}``."""
    body = {"error": code, "detail": detail, "request_id": getattr(request.state, "request_id", None), **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def http_error_code(status: int) -> str:
    """The ``error`` code of a Starlette HTTP error: ``not_found``, ``method_not_allowed``, ``http_<status>``."""
    return HTTP_ERROR_CODES.get(status, f"http_{status}")


def describe_validation_problem(error: dict[str, Any]) -> str:
    """``"<loc.parts>: <msg>"`` for one entry of ``RequestValidationError.errors()``."""
    return f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg')}"


def install_error_handlers(app: FastAPI, *,
                           describe_problem: Callable[[dict[str, Any]], str] = describe_validation_problem) -> None:
    """Answer ``BrainscanError`` (its ``http_status``), request validation errors (422
    ``invalid_request``, problems described by ``describe_problem``) and Starlette HTTP errors
    with :func:`error_response`."""

    async def brainscan_error(request: Request, exc: BrainscanError) -> JSONResponse:
        # an error may carry more than its code and message (the series of a study, to map them)
        extra = {key: value for key, value in exc.to_dict().items() if key not in ("error", "detail")}
        return error_response(request, exc.http_status, exc.code, exc.message, **extra)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [describe_problem(error) for error in exc.errors()]
        return error_response(request, 422, "invalid_request", "; ".join(problems) or "invalid request")

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, http_error_code(exc.status_code), str(exc.detail))

    app.add_exception_handler(BrainscanError, brainscan_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
