"""FastAPI app of the classifier service (contract: ``docs/HELPERS.md``, "Classifier service contract").

Routes:
    POST /v1/classify?model=resnet50|vit_cnn&explain=true   multipart field ``file``: one image
    GET  /v1/models    the loaded models and their manifests (validation metrics included)
    GET  /healthz      the process is alive
    GET  /readyz       200 when at least one model is loaded, else 503; names missing / failed models
    GET  /metrics      Prometheus text format

Models are loaded once, in the lifespan. Every error is JSON ``{"error", "detail", "request_id"}``:
``BrainscanError`` subclasses map to their ``http_status``; request validation errors to 422.
Each request is logged as one JSON line with its ``request_id`` (``X-Request-ID`` from the client,
or a fresh uuid4 hex), which is echoed in the response header.

Run:
    uvicorn services.classifier.app:app --port 8101
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from brainscan.errors import BrainscanError, InputTooLargeError
from services.classifier.metrics import ServiceMetrics
from services.classifier.predictor import Predictor
from services.classifier.settings import Settings

log = logging.getLogger("services.classifier")

REQUEST_ID_HEADER = "X-Request-ID"
#: client request ids are echoed into logs and headers, so only plain tokens are accepted
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: room for the multipart boundary and part headers around the file itself
MULTIPART_OVERHEAD = 16 * 1024
UPLOAD_CHUNK = 64 * 1024
CLASSIFY_PATH = "/v1/classify"


# -- logging ----------------------------------------------------------------------------------

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")})
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (test runners swap it), like ``logging.lastResort``."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: str) -> None:
    """Send the service's logs to stderr as JSON lines (once per process)."""
    log.setLevel(level)
    if not any(isinstance(handler, _StderrHandler) for handler in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)


# -- errors -----------------------------------------------------------------------------------


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(request: Request, status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    """The JSON error body every failure uses."""
    body = {"error": code, "detail": detail, "request_id": _request_id(request), **extra}
    return JSONResponse(body, status_code=status)


async def _brainscan_error(request: Request, exc: BrainscanError) -> JSONResponse:
    return error_response(request, exc.http_status, exc.code, exc.message)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        if error.get("type") == "missing" and tuple(error.get("loc", ()))[-1:] == ("file",):
            problems.append("no file: send the image as the multipart/form-data field 'file' "
                            "(e.g. curl -F file=@slice.jpg .../v1/classify)")
        else:
            problems.append(f"{where}: {error.get('msg')}")
    return error_response(request, 422, "invalid_request", "; ".join(problems) or "invalid request")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(request, exc.status_code, codes.get(exc.status_code, f"http_{exc.status_code}"),
                          str(exc.detail))


# -- dependencies -----------------------------------------------------------------------------


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_predictor(request: Request) -> Predictor:
    return request.app.state.predictor


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


async def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """Read an upload in chunks, stopping as soon as it exceeds ``max_bytes``.

    Raises:
        InputTooLargeError: (413) more than ``max_bytes`` bytes.
    """
    data = bytearray()
    while chunk := await file.read(min(UPLOAD_CHUNK, max_bytes + 1 - len(data))):
        data += chunk
        if len(data) > max_bytes:
            raise InputTooLargeError(f"{file.filename or 'the upload'} is larger than the limit of "
                                     f"{max_bytes} bytes; downscale or recompress it")
    return bytes(data)


# -- app --------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the classifier service app.

    Args:
        settings: the service settings; ``None`` reads them from the environment.

    Returns:
        a FastAPI app whose lifespan loads the models (``app.state.predictor``).
    """
    settings = settings if settings is not None else Settings()
    configure_logging(settings.log_level)
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        predictor = Predictor(settings, metrics)
        await run_in_threadpool(predictor.load)
        await predictor.start()
        app.state.predictor = predictor
        log.info("classifier ready" if predictor.models else "classifier started WITHOUT models",
                 extra=predictor.readiness())
        try:
            yield
        finally:
            await predictor.close()

    app = FastAPI(
        title="brainscan classifier service",
        version="1",
        summary="Internal service: classifies one 2D brain-MRI slice and explains the decision. "
                "Not for clinical use.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_exception_handler(BrainscanError, _brainscan_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        request.state.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.log = {}
        started = time.perf_counter()
        response = await _guarded(request, call_next)
        seconds = time.perf_counter() - started
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        metrics.observe_request(template, request.method, response.status_code, seconds)
        response.headers[REQUEST_ID_HEADER] = request.state.request_id
        log.info("request", extra={
            "request_id": request.state.request_id, "method": request.method, "path": request.url.path,
            "route": template, "status": response.status_code, "duration_ms": round(seconds * 1000.0, 2),
            **request.state.log,
        })
        return response

    async def _guarded(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length", "")
        if request.url.path == CLASSIFY_PATH and length.isdigit() \
                and int(length) > settings.max_upload_bytes + MULTIPART_OVERHEAD:
            # refuse before reading the body; smaller bodies are capped while the file is read
            return error_response(request, 413, InputTooLargeError.code,
                                  f"the request body is {length} bytes; uploads are limited to "
                                  f"{settings.max_upload_bytes} bytes")
        try:
            return await call_next(request)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request.state.request_id})
            return error_response(request, 500, "internal_error",
                                  "the classifier failed unexpectedly; the error is logged under this request_id")

    @app.post(CLASSIFY_PATH, summary="Classify one 2D MRI slice")
    async def classify(
        request: Request,
        predictor: PredictorDep,
        settings: SettingsDep,
        file: Annotated[UploadFile, File(description="one PNG/JPEG/BMP/TIFF/WebP image, judged by content")],
        model: Annotated[str | None, Query(description="architecture, e.g. resnet50 or vit_cnn")] = None,
        explain: Annotated[bool, Query(description="false skips the heatmap")] = True,
    ) -> JSONResponse:
        """Classify the uploaded slice; see the contract for the body."""
        predictor.resolve(model)  # 404 / 503 before touching the upload
        raw = await read_upload(file, settings.max_upload_bytes)
        body = await predictor.classify(raw, filename=(file.filename or "upload")[:100], model=model,
                                        explain=explain)
        body["request_id"] = request.state.request_id
        request.state.log = {"model": body["model"]["name"], "label": body["label"],
                             "timings": {k: round(v, 2) for k, v in body["timings"].items()}}
        return JSONResponse(body)

    @app.get("/v1/models", summary="Loaded models and their manifests")
    async def list_models(predictor: PredictorDep, settings: SettingsDep) -> dict[str, Any]:
        return {"default": settings.default_model,
                "models": [loaded.describe() for loaded in predictor.models.values()]}

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: at least one model is loaded")
    async def readyz(request: Request, predictor: PredictorDep) -> JSONResponse:
        state = predictor.readiness()
        if state["ready"]:
            return JSONResponse({"status": "ready", **state})
        problems = {**state["missing"], **state["failed"]} or {"store": "no classification bundle found"}
        detail = "no classification model is loaded: " + "; ".join(f"{k}: {v}" for k, v in problems.items())
        return error_response(request, 503, "not_ready", detail, **state)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def prometheus_metrics(metrics: MetricsDep) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


app = create_app()
