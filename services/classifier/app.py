"""FastAPI app of the classifier service (contract: ``docs/CONTRACTS.md``, "Classifier service contract").

Routes:
    POST /v1/classify?model=resnet50|vit_cnn&explain=true   multipart field ``file``: one image
    GET  /v1/models    the loaded models and their manifests (validation metrics included)
    GET  /healthz      the process is alive
    GET  /readyz       200 when at least one model is loaded, else 503; names missing / failed models
    GET  /metrics      Prometheus text format

Every route but ``/healthz`` and ``/readyz`` needs the internal token (``X-Brainscan-Internal-Token``,
or ``Authorization: Bearer`` for Prometheus; see :mod:`serving.internal_auth`): without it, 401.
Outside development mode the service does not start without ``BRAINSCAN_INTERNAL_TOKEN``.

Models are loaded once, in the lifespan. Every error is JSON ``{"error", "detail", "request_id"}``:
``BrainscanError`` subclasses map to their ``http_status``; request validation errors and a
repeated ``file`` field (``duplicate_field``) to 422. A classification whose caller disconnects
(the gateway's timeout, a closed connection) is cancelled: work not started yet is dropped from
the queues, and the access log records status 499.
Each request is logged as one JSON line with its ``request_id`` (``X-Request-ID`` from the client,
or a fresh uuid4 hex), which is echoed in the response header.

The handlers are an :class:`~fastapi.APIRouter` in :mod:`services.classifier.routes`;
:func:`create_app` builds the app's state, includes the router and installs the error handlers.

Run:
    BRAINSCAN_INTERNAL_TOKEN=... uvicorn services.classifier.app:app --port 8101
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from serving import web
from serving.internal_auth import internal_auth_guard
from services.classifier.metrics import ServiceMetrics
from services.classifier.predictor import Predictor
from services.classifier.routes import CLASSIFY_PATH, get_metrics, get_predictor, get_settings, read_upload, router
from services.classifier.settings import Settings

log = logging.getLogger("services.classifier")

#: what this module offered before the routes moved to :mod:`services.classifier.routes`
__all__ = ["CLASSIFY_PATH", "MULTIPART_OVERHEAD", "app", "create_app", "get_metrics", "get_predictor",
           "get_settings", "read_upload"]

#: room for the multipart boundary and part headers around the file itself
MULTIPART_OVERHEAD = 16 * 1024


# -- errors -----------------------------------------------------------------------------------


def _describe_problem(error: dict[str, Any]) -> str:
    """One validation problem; a missing upload gets a hint on how to send it."""
    if error.get("type") == "missing" and tuple(error.get("loc", ()))[-1:] == ("file",):
        return ("no file: send the image as the multipart/form-data field 'file' "
                "(e.g. curl -F file=@slice.jpg .../v1/classify)")
    return web.describe_validation_problem(error)


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
    app.include_router(router)
    return app


app = create_app()
