"""FastAPI app of the classifier service (contract: ``docs/CONTRACTS.md``, "Classifier service contract").

Routes:
    POST /v1/classify?model=resnet50|vit_cnn&explain=true   multipart field ``file``: one image
    GET  /v1/models    the loaded models and their manifests (validation metrics included)
    GET  /healthz      the process is alive
    GET  /readyz       200 when at least one model is loaded, else 503; names missing / failed models
    GET  /metrics      Prometheus text format

Every route but ``/healthz`` and ``/readyz`` needs the internal token (``X-Brainscan-Internal-Token``,
or ``Authorization: Bearer`` for Prometheus; see :mod:`brainscan.internal_auth`): without it, 401.
Outside development mode the service does not start without ``BRAINSCAN_INTERNAL_TOKEN``.

Models are loaded once, in the lifespan. Every error is JSON ``{"error", "detail", "request_id"}``:
``BrainscanError`` subclasses map to their ``http_status``; request validation errors and a
repeated ``file`` field (``duplicate_field``) to 422. A classification whose caller disconnects
(the gateway's timeout, a closed connection) is cancelled: work not started yet is dropped from
the queues, and the access log records status 499.
Each request is logged as one JSON line with its ``request_id`` (``X-Request-ID`` from the client,
or a fresh uuid4 hex), which is echoed in the response header.

Run:
    BRAINSCAN_INTERNAL_TOKEN=... uvicorn services.classifier.app:app --port 8101
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from brainscan import web
from brainscan.api_models import Classification, ClassificationModels, ClassifierReady, Health, error_responses
from brainscan.errors import InputTooLargeError
from brainscan.internal_auth import internal_auth_guard
from brainscan.web import error_response, refuse_repeated_form_fields, unless_client_leaves
from services.classifier.metrics import ServiceMetrics
from services.classifier.predictor import Predictor
from services.classifier.settings import Settings

log = logging.getLogger("services.classifier")

#: room for the multipart boundary and part headers around the file itself
MULTIPART_OVERHEAD = 16 * 1024
UPLOAD_CHUNK = 64 * 1024
CLASSIFY_PATH = "/v1/classify"


# -- errors -----------------------------------------------------------------------------------


def _describe_problem(error: dict[str, Any]) -> str:
    """One validation problem; a missing upload gets a hint on how to send it."""
    if error.get("type") == "missing" and tuple(error.get("loc", ()))[-1:] == ("file",):
        return ("no file: send the image as the multipart/form-data field 'file' "
                "(e.g. curl -F file=@slice.jpg .../v1/classify)")
    return web.describe_validation_problem(error)


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

    Raises:
        MissingSecretError: no internal token outside development mode.
    """
    settings = settings if settings is not None else Settings()
    web.configure_logging(log, settings.log_level)
    token = settings.require_internal_token("the classifier")
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
    web.install_error_handlers(app, describe_problem=_describe_problem)

    guard = internal_auth_guard(log, token=token, service="classifier", inner=web.upload_guard(
        log, path=CLASSIFY_PATH, max_upload_bytes=settings.max_upload_bytes, overhead=MULTIPART_OVERHEAD,
        service="classifier"))
    web.add_request_context(app, log, observe=metrics.observe_request, guard=guard)

    @app.post(CLASSIFY_PATH, summary="Classify one 2D MRI slice", response_model=Classification,
              responses=error_responses(400, 401, 404, 413, 415, 422, 503))
    async def classify(
        request: Request,
        predictor: PredictorDep,
        settings: SettingsDep,
        file: Annotated[UploadFile, File(description="one PNG/JPEG/BMP/TIFF/WebP image, judged by content")],
        model: Annotated[str | None, Query(description="architecture, e.g. resnet50 or vit_cnn")] = None,
        explain: Annotated[bool, Query(description="false skips the heatmap")] = True,
    ) -> JSONResponse:
        """Classify the uploaded slice; see the contract for the body."""
        # FastAPI has parsed the form already (and kept the last 'file'); this reads it again
        refuse_repeated_form_fields(await request.form(), hint="send one image in the field 'file'")
        predictor.resolve(model)  # 404 / 503 before touching the upload
        raw = await read_upload(file, settings.max_upload_bytes)
        body = await unless_client_leaves(request, predictor.classify(
            raw, filename=(file.filename or "upload")[:100], model=model, explain=explain))
        body["request_id"] = request.state.request_id
        request.state.log = {"model": body["model"]["name"], "label": body["label"],
                             "timings": {k: round(v, 2) for k, v in body["timings"].items()}}
        return JSONResponse(body)

    @app.get("/v1/models", summary="Loaded models and their manifests", response_model=ClassificationModels,
             response_model_exclude_unset=True, responses=error_responses(401))
    async def list_models(predictor: PredictorDep, settings: SettingsDep) -> dict[str, Any]:
        return {"default": settings.default_model,
                "models": [loaded.describe() for loaded in predictor.models.values()]}

    @app.get("/healthz", summary="Liveness: the process answers", response_model=Health,
             response_model_exclude_unset=True)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: at least one model is loaded", response_model=ClassifierReady,
             responses=error_responses(503))
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
