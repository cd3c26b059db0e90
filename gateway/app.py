"""The public gateway: one JSON API under ``/api``, the web page at ``/``, metrics at ``/metrics``.

The gateway holds no model and never imports TensorFlow: it checks API keys, bounds uploads
while they stream in, forwards classifications to the classifier service and segmentation jobs
to the segmenter (:mod:`gateway.segmentations`, with the owner id of :mod:`gateway.ownership`),
and maps those services' failures to 502/503/504 JSON. Run it with
``uvicorn gateway.app:app --port 8000`` (settings: see :mod:`gateway.settings`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from brainscan import __version__
from brainscan.api_models import Classification, ClassificationModels, GatewayReady, Health
from serving.internal_auth import INTERNAL_TOKEN_HEADER
from serving.web import ClientGoneError, error_response, http_error_code, unless_client_leaves
from gateway.examples import CLASSIFY_BODY, CLASSIFY_RESPONSES, HEALTH_RESPONSES, MODELS_RESPONSES, READY_RESPONSES
from gateway.metrics import GatewayMetrics, RequestContextMiddleware, configure_logging
from gateway.ownership import BrowserSessionMiddleware
from gateway.proxy import MODEL_NAME_PATTERN, GatewayError, Upstream, read_limited_body
from gateway.segmentations import SEGMENTER_START_HINT, build_segmentation_router
from gateway.security import ApiKeyError, FailedKeyThrottle, SecurityHeadersMiddleware, add_cors, require_api_key
from gateway.settings import GatewaySettings, get_settings

logger = logging.getLogger("brainscan.gateway")

CLASSIFIER_START_HINT = " (uvicorn services.classifier.app:app --port 8101)"
#: ``Retry-After`` of a 503 from ``/api/ready``
READY_RETRY_AFTER_S = 10


def get_app_settings(request: Request) -> GatewaySettings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_classifier(request: Request) -> Upstream:
    """The classifier service client (created in the lifespan)."""
    return request.app.state.classifier


SettingsDep = Annotated[GatewaySettings, Depends(get_app_settings)]
ClassifierDep = Annotated[Upstream, Depends(get_classifier)]


def passthrough(response: httpx.Response) -> Response:
    """The upstream answer unchanged: same status, same JSON bytes."""
    headers = {"Retry-After": response.headers["retry-after"]} if "retry-after" in response.headers else None
    return Response(response.content, status_code=response.status_code, media_type="application/json",
                    headers=headers)


async def probe_ready(client: httpx.AsyncClient, name: str, base_url: str, timeout_s: float) -> dict[str, Any]:
    """Ask one service's ``/readyz``; never raises.

    Returns:
        ``{"status": "ready" | "not ready" | "unreachable" | "not configured", "detail": str}``.
    """
    if not base_url:
        return {"status": "not configured", "detail": f"No {name} URL is configured; its features are off."}
    try:
        response = await client.get(f"{base_url}/readyz", timeout=timeout_s)
    except httpx.TimeoutException:
        return {"status": "unreachable", "detail": f"The {name} did not answer within {timeout_s:g} s."}
    except httpx.TransportError as exc:
        return {"status": "unreachable", "detail": f"The {name} is not reachable ({type(exc).__name__})."}
    if response.status_code == 200:
        return {"status": "ready", "detail": f"The {name} is ready."}
    try:
        upstream_detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        upstream_detail = ""
    return {"status": "not ready",
            "detail": f"The {name} answered HTTP {response.status_code}. {upstream_detail}".strip()}


def _build_api_router() -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/health", tags=["probes"], summary="The gateway process is alive", response_model=Health,
                responses=HEALTH_RESPONSES)
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "gateway", "version": __version__}

    @router.get("/ready", tags=["probes"], summary="All configured services are ready",
                response_model=GatewayReady, responses=READY_RESPONSES)
    async def ready(request: Request, settings: SettingsDep) -> JSONResponse:
        client: httpx.AsyncClient = request.app.state.http
        names = ("classifier", "segmenter")
        results = await asyncio.gather(*(
            probe_ready(client, name, url, settings.ready_timeout_s)
            for name, url in zip(names, (settings.classifier_url, settings.segmenter_url))))
        services = dict(zip(names, results))
        failing = [name for name, result in services.items() if result["status"] not in ("ready", "not configured")]
        if not failing:
            return JSONResponse({"status": "ready", "services": services})
        # e.g. the segmenter while its broker restarts: a probe or a client may ask again soon
        return JSONResponse({"status": "not ready", "error": "service_unavailable",
                             "detail": f"Not ready: {', '.join(failing)}. See 'services' for each one.",
                             "request_id": request.state.request_id, "services": services}, status_code=503,
                            headers={"Retry-After": str(READY_RETRY_AFTER_S)})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["classification"])

    @v1.get("/models", summary="Classification models available", response_model=ClassificationModels,
            responses=MODELS_RESPONSES)
    async def list_models(request: Request, classifier: ClassifierDep) -> Response:
        response = await classifier.request("GET", "/v1/models", request_id=request.state.request_id)
        return passthrough(response)

    @v1.post("/classifications", summary="Classify one 2D MRI slice", response_model=Classification,
             responses=CLASSIFY_RESPONSES, openapi_extra=CLASSIFY_BODY,
             description="Upload one image as multipart/form-data field `file`. Answers the predicted "
                         "class, all four probabilities, a heatmap of the regions that drove the "
                         "prediction, and timings. Research software: not for clinical use.")
    async def create_classification(
        request: Request,
        settings: SettingsDep,
        classifier: ClassifierDep,
        model: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN,
                                           description="Model name from /api/v1/models (default: the server's)")] = None,
        explain: Annotated[bool | None, Query(description="false skips the heatmap (faster)")] = None,
    ) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise GatewayError(415, "unsupported_media_type",
                               "Send the image as multipart/form-data in a field named 'file' "
                               "(a browser form upload or `curl -F file=@slice.jpg`).")
        body = await read_limited_body(request, settings.max_upload_bytes)
        params = {}
        if model is not None:
            params["model"] = model
        if explain is not None:
            params["explain"] = "true" if explain else "false"
        # a caller that leaves cancels the upstream call, which closes its connection: the
        # classifier then drops the work too
        response = await unless_client_leaves(request, classifier.request(
            "POST", "/v1/classify", request_id=request.state.request_id, content=body,
            content_type=content_type, params=params))
        return passthrough(response)

    router.include_router(v1)
    router.include_router(build_segmentation_router())
    return router


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.detail, headers=exc.headers or None)

    @app.exception_handler(ClientGoneError)
    async def client_gone(request: Request, exc: ClientGoneError) -> JSONResponse:
        return error_response(request, exc.http_status, exc.code, exc.message)

    @app.exception_handler(ApiKeyError)
    async def api_key_error(request: Request, exc: ApiKeyError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.detail, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', '')}"
                             for error in exc.errors())
        return error_response(request, 422, "invalid_request", f"The request is not valid ({problems}). "
                                                               "See /docs for the expected parameters.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        details = {404: "There is nothing at this address. The API lives under /api/v1; see /docs.",
                   405: "This address does not accept that HTTP method. See /docs."}
        return error_response(request, exc.status_code, http_error_code(exc.status_code),
                              details.get(exc.status_code, str(exc.detail)), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", extra={"request_id": getattr(request.state, "request_id", None)})
        return error_response(request, 500, "internal_error", "The gateway failed unexpectedly. Try again; if "
                                                              "it persists, report the request id to the operator.")


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """Build the gateway app.

    Args:
        settings: configuration; ``None`` reads the ``GATEWAY_*`` environment.

    Returns:
        The FastAPI app: ``/api/*`` routes, ``/metrics``, ``/docs``, and the static page at ``/``
        (mounted last so that it never shadows an API route).

    Raises:
        MissingSecretError: no internal token outside development mode.
    """
    settings = settings or get_settings()
    metrics = GatewayMetrics()
    app_logger = configure_logging(settings.log_level)
    token = settings.require_internal_token("the gateway")
    # every upstream call (and readiness probe) carries the internal token
    upstream_headers = {INTERNAL_TOKEN_HEADER: token} if token else {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        # trust_env=False: calls to internal services must never go through a proxy from the env.
        async with httpx.AsyncClient(timeout=timeout, trust_env=False, headers=upstream_headers,
                                     limits=httpx.Limits(max_connections=64, max_keepalive_connections=16)) as client:
            app.state.http = client
            app.state.classifier = Upstream("classifier", settings.classifier_url, client, metrics,
                                            start_hint=CLASSIFIER_START_HINT)
            app.state.segmenter = (Upstream("segmenter", settings.segmenter_url, client, metrics,
                                            start_hint=SEGMENTER_START_HINT, timeout_hint="")
                                   if settings.segmenter_enabled else None)
            app_logger.info("gateway started", extra={"classifier_url": settings.classifier_url,
                                                      "segmenter_url": settings.segmenter_url or None,
                                                      "api_keys": settings.api_keys_enabled})
            yield

    app = FastAPI(title="brainscan gateway", version=__version__, lifespan=lifespan,
                  description="Public API of brainscan: brain MRI tumour classification (2D slices) and "
                              "3D tumour segmentation (BraTS cases, as background jobs). "
                              "**Research software — not for clinical use.**")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.key_throttle = FailedKeyThrottle(settings.api_key_max_failures, settings.api_key_failure_window_s)
    _install_error_handlers(app)
    app.include_router(_build_api_router())

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    # Outermost last: request id + metrics see every answer, security headers go on all of them.
    add_cors(app, settings)
    app.add_middleware(BrowserSessionMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    known_paths = frozenset(app.openapi()["paths"]) | {"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                                                       "/openapi.json"}
    app.add_middleware(RequestContextMiddleware, metrics=metrics, logger=app_logger, known_paths=known_paths)

    if settings.frontend_dir.is_dir():
        app.mount("/", StaticFiles(directory=settings.frontend_dir, html=True), name="frontend")
    else:
        app_logger.warning("frontend folder not found; / will answer 404",
                           extra={"frontend_dir": str(settings.frontend_dir)})
    return app


app = create_app()
