"""The routes of the classifier service, as one :class:`fastapi.APIRouter`.

Handlers take the settings, the predictor and the metrics from ``request.app.state`` through
FastAPI dependencies (:func:`get_settings`, :func:`get_predictor`, :func:`get_metrics`), so
:func:`services.classifier.app.create_app` only builds that state, includes :data:`router` and
installs the error handlers. The routes are listed in :mod:`services.classifier.app`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from brainscan.api_models import Classification, ClassificationModels, ClassifierReady, Health, error_responses
from brainscan.errors import InputTooLargeError
from serving.web import error_response, refuse_repeated_form_fields, unless_client_leaves
from services.classifier.metrics import ServiceMetrics
from services.classifier.predictor import Predictor
from services.classifier.settings import Settings

UPLOAD_CHUNK = 64 * 1024
CLASSIFY_PATH = "/v1/classify"

router = APIRouter()


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


# -- routes -----------------------------------------------------------------------------------


@router.post(CLASSIFY_PATH, summary="Classify one 2D MRI slice", response_model=Classification,
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


@router.get("/v1/models", summary="Loaded models and their manifests", response_model=ClassificationModels,
            response_model_exclude_unset=True, responses=error_responses(401))
async def list_models(predictor: PredictorDep, settings: SettingsDep) -> dict[str, Any]:
    return {"default": settings.default_model,
            "models": [loaded.describe() for loaded in predictor.models.values()]}


@router.get("/healthz", summary="Liveness: the process answers", response_model=Health,
            response_model_exclude_unset=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: at least one model is loaded", response_model=ClassifierReady,
            responses=error_responses(503))
async def readyz(request: Request, predictor: PredictorDep) -> JSONResponse:
    state = predictor.readiness()
    if state["ready"]:
        return JSONResponse({"status": "ready", **state})
    problems = {**state["missing"], **state["failed"]} or {"store": "no classification bundle found"}
    detail = "no classification model is loaded: " + "; ".join(f"{k}: {v}" for k, v in problems.items())
    return error_response(request, 503, "not_ready", detail, **state)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)
