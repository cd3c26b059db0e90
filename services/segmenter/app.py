"""FastAPI app of the segmenter job API (contract: ``docs/CONTRACTS.md``, "Segmenter contract").

Routes:
    POST   /v1/jobs?model=unet3d        multipart: ``t1``+``t1ce``+``t2``+``flair`` (or BraTS 2023-2024
                                        ``t1n``+``t1c``+``t2w``+``t2f``), or ``case`` (zip), or
                                        ``volume`` (4D), or ``dicom`` (a study zip, optional text
                                        ``series``), or texts ``pacs`` + ``study_uid`` (a study pulled
                                        from a configured PACS, see ``dicom_intake``); header
                                        ``X-Brainscan-Owner``. 202 + job body
    GET    /v1/jobs/{id}                the job body (404 for another owner's job)
    GET    /v1/jobs/{id}/files/{name}   an input, or once succeeded the mask / a preview
    DELETE /v1/jobs/{id}                cancels a queued or running job (200 + body), deletes a finished one (204)
    GET    /v1/models                   segmentation bundles in the store (manifests; no TensorFlow)
    GET    /healthz                     the process is alive
    GET    /readyz                      200 when the job store is writable, the broker answers and a
                                        segmentation bundle exists; else 503 naming what is wrong
    GET    /metrics                     Prometheus text format

Every route but ``/healthz`` and ``/readyz`` needs the internal token (``X-Brainscan-Internal-Token``,
see :mod:`serving.internal_auth`), so ``X-Brainscan-Owner`` is only ever honoured on a request
the gateway authenticated; anything else gets 401. Jobs store only a hash of the owner id
(:func:`services.segmenter.jobs.owner_digest`); records written before that are rewritten at start-up
(:meth:`services.segmenter.store.LocalJobStore.hash_legacy_owners`) and stay readable by their owner.
Outside development mode the API does not start without ``BRAINSCAN_INTERNAL_TOKEN`` and a Redis password.

The API never imports TensorFlow: it validates uploads (``intake``), stores jobs (``store``) and
enqueues them by task name with a Celery app from :func:`services.segmenter.celery_app.make_celery`.
Every error is JSON ``{"error", "detail", "request_id"}``; each request is logged as one JSON line.
Expired jobs are swept by a background task every ``expire_interval_s``; another queues again the
jobs that lost their worker or their queue message (:mod:`services.segmenter.reconcile`). While the
broker is down, ``POST /v1/jobs`` answers 503 with ``Retry-After`` before reading the upload.

Layout: the handlers are an :class:`~fastapi.APIRouter` in :mod:`services.segmenter.routes`;
the job queue is :mod:`services.segmenter.broker`, the model catalog :mod:`services.segmenter.catalog`.
:func:`create_app` builds their state, includes the router and installs the error handlers.

Run:
    BRAINSCAN_INTERNAL_TOKEN=... BRAINSCAN_REDIS_PASSWORD=... uvicorn services.segmenter.app:app --port 8102
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from serving import web
from brainscan.errors import InputTooLargeError
from serving.internal_auth import internal_auth_guard
from serving.web import error_response
from services.segmenter.broker import BROKER_RETRY_AFTER_S, JobQueue, ServiceUnavailableError, require_broker
from services.segmenter.catalog import SEGMENTATION, ModelCatalog, UnknownModelError
from services.segmenter.intake import IntakeLimits
from services.segmenter.metrics import ServiceMetrics
from services.segmenter.reconcile import Reconciler
from services.segmenter.routes import (
    JOBS_PATH,
    MEDIA_TYPES,
    MULTIPART_OVERHEAD,
    OWNER_HEADER,
    NotInternalCallerError,
    get_catalog,
    get_limits,
    get_metrics,
    get_owner,
    get_queue,
    get_settings,
    get_store,
    read_form,
    router,
)
from services.segmenter.settings import Settings
from services.segmenter.store import LocalJobStore

log = logging.getLogger("services.segmenter")

#: what this module offered before the routes moved to :mod:`services.segmenter.routes`
__all__ = ["BROKER_RETRY_AFTER_S", "JOBS_PATH", "MEDIA_TYPES", "MULTIPART_OVERHEAD", "OWNER_HEADER", "SEGMENTATION",
           "JobQueue", "ModelCatalog", "NotInternalCallerError", "ServiceUnavailableError", "UnknownModelError",
           "app", "create_app", "get_catalog", "get_limits", "get_metrics", "get_owner", "get_queue",
           "get_settings", "get_store", "read_form", "require_broker"]


def create_app(settings: Settings | None = None, *, queue: JobQueue | None = None) -> FastAPI:
    """Build the segmenter API.

    Args:
        settings: the settings; ``None`` reads them from the environment.
        queue: the job queue (default: Celery on ``settings.broker_url``); tests may also replace it
            with ``app.dependency_overrides[get_queue]``.

    Returns:
        a FastAPI app whose lifespan hashes legacy owner ids and runs the expiry sweep.

    Raises:
        MissingSecretError: no internal token or no Redis password outside development mode.
    """
    settings = settings if settings is not None else Settings()
    web.configure_logging(log, settings.log_level, propagate=False)
    token = settings.require_internal_token("the segmenter API")
    settings.require_redis_password("the segmenter API")
    metrics = ServiceMetrics()
    store = LocalJobStore(settings.jobs_dir, ttl_s=settings.job_ttl_s)

    async def sweep_expired() -> None:
        while True:
            try:
                removed = await run_in_threadpool(store.expire)
                metrics.jobs_expired.inc(len(removed))
            except Exception:  # noqa: BLE001 - the sweep must survive a bad folder; it is logged
                log.exception("job expiry sweep failed")
            await asyncio.sleep(settings.expire_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hashed = await run_in_threadpool(store.hash_legacy_owners)
        if hashed:
            log.info("replaced the raw owner id of %d job(s) written before owner hashing by its hash", hashed)
        sweeper = asyncio.create_task(sweep_expired(), name="segmenter-expiry")
        # jobs that lost their worker or their queue message are queued again (services.segmenter.reconcile)
        reconciler = asyncio.create_task(
            Reconciler(settings, store, lambda job_id, task_id: app.state.queue.enqueue(job_id, task_id)).run_forever(),
            name="segmenter-reconciler")
        log.info("segmenter API started", extra={"jobs_dir": str(settings.jobs_dir), "models": catalog.names()})
        try:
            yield
        finally:
            for task in (sweeper, reconciler):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="brainscan segmenter service",
        version="1",
        summary="Internal service: segments brain tumours in 4-modality MRI as background jobs. "
                "Not for clinical use.",
        lifespan=lifespan,
    )
    catalog = ModelCatalog(settings)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.store = store
    app.state.catalog = catalog
    app.state.limits = IntakeLimits(max_upload_bytes=settings.max_upload_bytes, max_voxels=settings.max_voxels,
                                    max_dim=settings.max_dim)
    app.state.queue = queue if queue is not None else JobQueue(settings)
    # read through app.state at scrape time: tests may swap the queue after the app is built
    metrics.track_queue_length(lambda: app.state.queue.length())
    web.install_error_handlers(app)

    @app.exception_handler(ServiceUnavailableError)
    async def broker_unavailable(request: Request, exc: ServiceUnavailableError) -> JSONResponse:
        return error_response(request, exc.http_status, exc.code, exc.message,
                              headers={"Retry-After": str(BROKER_RETRY_AFTER_S)})

    guard = internal_auth_guard(log, token=token, service="segmenter API", inner=web.upload_guard(
        log, path=JOBS_PATH, max_upload_bytes=settings.max_upload_bytes, overhead=MULTIPART_OVERHEAD,
        service="segmenter", on_reject=metrics.uploads_rejected.labels(error=InputTooLargeError.code).inc))
    web.add_request_context(app, log, observe=metrics.observe_request, guard=guard)
    app.include_router(router)
    return app


app = create_app()
