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
see :mod:`brainscan.internal_auth`), so ``X-Brainscan-Owner`` is only ever honoured on a request
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

Run:
    BRAINSCAN_INTERNAL_TOKEN=... BRAINSCAN_REDIS_PASSWORD=... uvicorn services.segmenter.app:app --port 8102
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from brainscan import web
from brainscan.api_models import (
    BINARY_SCHEMA,
    Health,
    SegmentationJob,
    SegmentationModels,
    SegmentationUpload,
    SegmenterReady,
    error_responses,
    multipart_body,
)
from brainscan.errors import (
    BrainscanError,
    BundleError,
    InputTooLargeError,
    InvalidInputError,
    UnsupportedFormatError,
)
from brainscan.internal_auth import (
    INTERNAL_TOKEN_HEADER,
    REDIS_PASSWORD_VARIABLE,
    internal_auth_guard,
    is_internal_caller,
)
from brainscan.web import error_response
from services.segmenter.dicom_intake import PACS_FIELD, accept_pacs
from services.segmenter.intake import UPLOAD_FIELDS, IntakeLimits, UploadPart, accept_upload
from services.segmenter.jobs import FINAL, MODALITY_FILES, JobNotFoundError, JobStateError, is_owned_by, public_view
from services.segmenter.metrics import ServiceMetrics
from services.segmenter.reconcile import Reconciler
from services.segmenter.settings import QUEUE, TASK_NAME, Settings
from services.segmenter.store import JobStore, LocalJobStore, check_file_name

log = logging.getLogger("services.segmenter")

OWNER_HEADER = "X-Brainscan-Owner"
#: owner ids are opaque (the gateway derives them), but they end up in logs and JSON
_OWNER = re.compile(r"^[A-Za-z0-9._:@+=/-]{1,256}$")
#: room for boundaries and part headers around the files themselves
MULTIPART_OVERHEAD = 64 * 1024
JOBS_PATH = "/v1/jobs"
SEGMENTATION = "segmentation"
MEDIA_TYPES = {".png": "image/png", ".gz": "application/gzip", ".dcm": "application/dicom",
               ".json": "application/json", ".zip": "application/zip"}


class UnknownModelError(BrainscanError):
    """A ``?model=`` this service has never heard of (404)."""

    code = "unknown_model"
    http_status = 404


class NotInternalCallerError(BrainscanError):
    """An owner header on a request the internal token did not authenticate (401)."""

    code = "unauthorized"
    http_status = 401


class ServiceUnavailableError(BrainscanError):
    """The broker cannot take the job right now (503, with ``Retry-After``)."""

    code = "service_unavailable"
    http_status = 503


#: ``Retry-After`` of a 503 while the broker is down (the launcher restarts Redis within seconds)
BROKER_RETRY_AFTER_S = 10


def require_broker(queue: JobQueue) -> None:
    """Raise :class:`ServiceUnavailableError` unless the broker answers (checked before an upload is read)."""
    try:
        queue.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        raise ServiceUnavailableError(f"the job queue is unreachable ({type(exc).__name__}); nothing was "
                                      f"uploaded; try again in {BROKER_RETRY_AFTER_S} s") from exc


# -- collaborators ------------------------------------------------------------------------------


class JobQueue:
    """Enqueues jobs on the Celery broker by task name, and checks that the broker answers."""

    def __init__(self, settings: Settings) -> None:
        from services.segmenter.celery_app import make_celery  # no task code, no TensorFlow, no import-time state

        self.settings = settings
        self.celery = make_celery(settings)
        # send_task subscribes to the result backend first; its default of 20 reconnection tries,
        # one a second, would hold a request for 20 s when Redis is down: fail fast and answer 503
        self.celery.conf.result_backend_transport_options = {
            **self.celery.conf.result_backend_transport_options,
            "retry_policy": {"max_retries": 1, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 0.5},
        }

    def enqueue(self, job_id: str) -> str:
        """Send ``segmenter.segment(job_id)`` to the ``segmentation`` queue; returns the task id.

        Raises:
            ServiceUnavailableError: the broker is unreachable.
        """
        try:
            return self.celery.send_task(TASK_NAME, args=[job_id], queue=QUEUE, retry=True).id
        except Exception as exc:  # kombu / redis raise a zoo of connection errors
            raise ServiceUnavailableError(f"the job queue is unreachable ({type(exc).__name__}); "
                                          "try again in a minute") from exc

    def _redis(self) -> Any:
        """A Redis client of the broker (with its password), timing out after ``broker_timeout_s``."""
        import redis

        return redis.Redis.from_url(self.settings.authenticated_broker_url,
                                    socket_connect_timeout=self.settings.broker_timeout_s,
                                    socket_timeout=self.settings.broker_timeout_s)

    def length(self) -> int:
        """Jobs waiting in the ``segmentation`` queue (kombu keeps it as a Redis list of that name).

        Raises:
            redis.exceptions.RedisError: the broker is unreachable (within ``broker_timeout_s``).
        """
        client = self._redis()
        try:
            return int(client.llen(QUEUE))
        finally:
            client.close()

    def ping(self) -> None:
        """Raise unless the broker answers a PING within ``broker_timeout_s`` (and accepts the password)."""
        client = self._redis()
        try:
            client.ping()
        finally:
            client.close()


class ModelCatalog:
    """The segmentation bundles of the model store, read from manifests (no TensorFlow)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _store(self) -> Any:
        from brainscan.models.store import ModelStore

        return ModelStore(self.settings.store_root())

    def names(self) -> list[str]:
        """Architectures with a folder under ``<store>/segmentation``."""
        task_dir = self._store().root / SEGMENTATION
        if not task_dir.is_dir():
            return []
        return sorted(d.name for d in task_dir.iterdir() if d.is_dir() and not d.name.startswith("."))

    def resolve(self, name: str | None) -> dict[str, Any]:
        """``{"name", "arch", "version", "demo"}`` of the current bundle of ``name`` (default model if None).

        Raises:
            UnknownModelError: (404) not in the store and not the default model.
            BundleError: (503, ``model_unavailable``) the model's bundle is missing or invalid.
        """
        from brainscan.models.bundle import read_manifest

        name = name or self.settings.default_model
        known = self.names()
        if name not in known and name != self.settings.default_model:
            raise UnknownModelError(f"unknown model {name[:64]!r}; choose one of {known} (GET /v1/models lists them)")
        store = self._store()
        try:
            path = store.current(SEGMENTATION, name)
            manifest = read_manifest(path)
        except (BundleError, ValueError) as exc:
            reason = self.settings.redact_paths(getattr(exc, "message", str(exc)))
            raise BundleError(f"model {name!r} is not available: {reason}", code="model_unavailable") from exc
        return {"name": name, "arch": manifest["architecture"]["name"], "version": manifest["version"],
                "demo": manifest["demo"]}

    def describe(self) -> list[dict[str, Any]]:
        """One entry per architecture for ``GET /v1/models`` (``error`` set for an unusable one)."""
        from brainscan.models.bundle import read_manifest

        store = self._store()
        entries = []
        for name in self.names():
            try:
                path = store.current(SEGMENTATION, name)
                manifest = read_manifest(path)
            except (BundleError, ValueError) as exc:
                entries.append({"name": name, "error": self.settings.redact_paths(getattr(exc, "message", str(exc)))})
                continue
            entries.append({
                "name": name, "arch": manifest["architecture"]["name"], "version": manifest["version"],
                "demo": manifest["demo"], "versions": store.versions(SEGMENTATION, name),
                "label_map": manifest.get("label_map"), "label_names": manifest.get("label_names"),
                "modalities": manifest["input"].get("modalities"), "inference": manifest.get("inference"),
                "metrics": manifest.get("metrics", {}), "created_at": manifest.get("created_at"),
                "manifest": manifest,
            })
        return entries


# -- dependencies -------------------------------------------------------------------------------


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_owner(request: Request, owner: Annotated[str | None, Header(alias=OWNER_HEADER)] = None) -> str:
    """The caller's owner id; jobs are visible only to the owner that created them.

    Honoured only on a request that the internal token authenticated (the gateway's): the guard
    refuses others before routing, and this checks it again, so that no route can trust the
    header on its own.

    Raises:
        NotInternalCallerError: (401) the request was not authenticated.
        BrainscanError: (400 ``missing_owner``) the header is absent or malformed.
    """
    if not is_internal_caller(request):
        raise NotInternalCallerError(f"{OWNER_HEADER} is honoured only on requests that carry the internal token "
                                     f"({INTERNAL_TOKEN_HEADER})")
    if owner is None or not _OWNER.match(owner):
        raise BrainscanError(f"send the header {OWNER_HEADER}: an opaque owner id (1-256 characters of "
                             "letters, digits and ._:@+=/-); the gateway sets it", code="missing_owner")
    return owner


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
OwnerDep = Annotated[str, Depends(get_owner)]


async def read_form(request: Request, max_bytes: int) -> FormData:
    """Parse the multipart body while counting its bytes; stop at ``max_bytes`` (+ multipart overhead).

    Raises:
        UnsupportedFormatError: (415) not ``multipart/form-data``.
        InputTooLargeError: (413) the body grew past the cap (nothing more is read).
        BrainscanError: (400 ``invalid_upload``) a malformed body.
    """
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UnsupportedFormatError("send the volumes as multipart/form-data (e.g. curl -F t1=@t1.nii.gz ...)",
                                     code="unsupported_media_type")
    limit = max_bytes + MULTIPART_OVERHEAD

    async def capped() -> AsyncIterator[bytes]:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise InputTooLargeError(f"the upload is larger than the limit of {max_bytes} bytes")
            yield chunk

    parser = MultiPartParser(request.headers, capped(), max_files=len(UPLOAD_FIELDS) + 2, max_fields=8,
                             max_part_size=64 * 1024)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise BrainscanError(f"malformed multipart body: {exc.message}", code="invalid_upload") from exc


def _owned_job(store: JobStore, job_id: str, owner: str) -> dict[str, Any]:
    """The job if ``owner`` owns it; another owner's job is indistinguishable from a missing one."""
    job = store.get(job_id)
    if not is_owned_by(job, owner):
        raise JobNotFoundError(f"no job {job_id!r}")
    return job


# -- app ----------------------------------------------------------------------------------------


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
    limits = IntakeLimits(max_upload_bytes=settings.max_upload_bytes, max_voxels=settings.max_voxels,
                          max_dim=settings.max_dim)

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
        reconciler = asyncio.create_task(Reconciler(settings, store, lambda job_id: app.state.queue.enqueue(job_id)
                                                    ).run_forever(), name="segmenter-reconciler")
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

    # the upload is read as a stream (read_form bounds it), so its form is documented from a model
    @app.post(JOBS_PATH, status_code=202, summary="Submit a segmentation job", response_model=SegmentationJob,
              responses=error_responses(400, 401, 404, 413, 415, 422, 503),
              openapi_extra=multipart_body(SegmentationUpload))
    async def submit_job(
        request: Request,
        store: StoreDep,
        queue: QueueDep,
        catalog: CatalogDep,
        metrics: MetricsDep,
        settings: SettingsDep,
        owner: OwnerDep,
        model: Annotated[str | None, Query(description="architecture, e.g. unet3d or attention_unet3d")] = None,
    ) -> JSONResponse:
        """Validate the upload, store the inputs and queue the job; poll the returned job's ``links.self``."""
        started = time.perf_counter()
        try:
            model_info = catalog.resolve(model)  # 404 / 503 before the body is read
            await run_in_threadpool(require_broker, queue)
            form = await read_form(request, settings.max_upload_bytes)
            try:
                parts = [UploadPart(field=key, filename=value.filename or key, file=value.file)
                         for key, value in form.multi_items() if isinstance(value, UploadFile)]
                texts = [(key, value) for key, value in form.multi_items() if not isinstance(value, UploadFile)]
                job_id, source = await run_in_threadpool(_intake, store, parts, texts, owner, model_info)
            finally:
                await form.close()
        except BrainscanError as exc:
            metrics.uploads_rejected.labels(error=exc.code).inc()
            raise
        metrics.intake.labels(source=source).observe(time.perf_counter() - started)
        try:
            task_id = await run_in_threadpool(queue.enqueue, job_id)
        except ServiceUnavailableError:
            metrics.enqueue_failures.inc()
            await run_in_threadpool(store.delete, job_id)
            raise
        job = await run_in_threadpool(lambda: store.update(job_id, task_id=task_id))
        metrics.jobs_submitted.labels(model=model_info["name"], source=source).inc()
        length = request.headers.get("content-length", "")
        if length.isdigit():
            metrics.upload_bytes.observe(int(length))
        request.state.log = {"job_id": job_id, "model": model_info["name"], "source": source}
        return JSONResponse(public_view(job), status_code=202, headers={"Location": f"{JOBS_PATH}/{job_id}"})

    def _intake(store: JobStore, parts: list[UploadPart], texts: list[tuple[str, str]], owner: str,
                model_info: dict[str, Any]) -> tuple[str, str]:
        names = [key for key, _ in texts]
        if len(set(names)) < len(names):
            raise InvalidInputError(f"field(s) {sorted({n for n in names if names.count(n) > 1})} sent more than "
                                    "once; send each field once", code="duplicate_field")
        with store.staging_dir() as staging:
            if PACS_FIELD in names:  # the study comes from a configured PACS, pulled here before queueing
                result = accept_pacs(parts, dict(texts), staging, limits, settings.dicomweb_servers,
                                     timeout_s=settings.dicomweb_timeout_s)
            else:
                result = accept_upload(parts, staging, limits, dict(texts))
            job_id = store.create(owner, model_info, result.meta, files=result.files)
        return job_id, result.meta["source"]

    @app.get(JOBS_PATH + "/{job_id}", summary="A job's status, progress and result", response_model=SegmentationJob,
             response_model_exclude_unset=True, responses=error_responses(400, 401, 404, 422))
    async def get_job(job_id: str, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
        return public_view(await run_in_threadpool(_owned_job, store, job_id, owner))

    @app.get(JOBS_PATH + "/{job_id}/files/{name}", summary="An input, or the mask / a preview of a finished job",
             response_class=FileResponse, responses={
                 200: {"description": "the file", "content": {media_type: {"schema": BINARY_SCHEMA}
                                                              for media_type in sorted(set(MEDIA_TYPES.values()))}},
                 **error_responses(400, 401, 404, 422)})
    async def get_job_file(job_id: str, name: str, store: StoreDep, owner: OwnerDep) -> FileResponse:
        job = await run_in_threadpool(_owned_job, store, job_id, owner)
        try:
            path = store.path_for(job_id, check_file_name(name))
        except ValueError:
            raise JobNotFoundError(f"job {job_id} has no file {name[:80]!r}") from None
        if (name not in MODALITY_FILES and job["status"] != "succeeded") or not path.is_file():
            raise JobNotFoundError(f"job {job_id} has no file {name!r} (status {job['status']})")
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"), filename=name)

    @app.delete(JOBS_PATH + "/{job_id}", summary="Cancel a queued or running job, or delete a finished one",
                response_model=SegmentationJob, responses={200: {"description": "cancelled; the job body"},
                                                           204: {"description": "deleted"},
                                                           **error_responses(400, 401, 404, 422)})
    async def delete_job(job_id: str, store: StoreDep, owner: OwnerDep, metrics: MetricsDep) -> Response:
        job = await run_in_threadpool(_owned_job, store, job_id, owner)
        if job["status"] not in FINAL:
            try:
                job = await run_in_threadpool(lambda: store.transition(
                    job_id, "cancelled", expect_status={"queued", "running"}, stage_detail="cancelled by the owner"))
                metrics.jobs_cancelled.inc()
                return JSONResponse(public_view(job))
            except JobStateError:
                pass  # it finished meanwhile: delete it like any finished job
        await run_in_threadpool(store.delete, job_id)
        return Response(status_code=204)

    @app.get("/v1/models", summary="Segmentation models in the store", response_model=SegmentationModels,
             response_model_exclude_unset=True, responses=error_responses(401))
    async def list_models(catalog: CatalogDep, settings: SettingsDep) -> dict[str, Any]:
        return {"default": settings.default_model, "models": await run_in_threadpool(catalog.describe)}

    @app.get("/healthz", summary="Liveness: the process answers", response_model=Health,
             response_model_exclude_unset=True)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: job store writable, broker reachable, a segmentation bundle present",
             response_model=SegmenterReady, responses=error_responses(503))
    async def readyz(request: Request, store: StoreDep, queue: QueueDep, catalog: CatalogDep) -> JSONResponse:
        checks = await run_in_threadpool(_readiness, store, queue, catalog)
        if all(check == "ok" for check in checks.values()):
            return JSONResponse({"status": "ready", "checks": checks})
        detail = "; ".join(f"{name}: {state}" for name, state in checks.items() if state != "ok")
        return error_response(request, 503, "not_ready", detail, checks=checks)

    def _readiness(store: JobStore, queue: JobQueue, catalog: ModelCatalog) -> dict[str, str]:
        checks = {}
        try:
            store.ping()
            checks["store"] = "ok"
        except OSError as exc:
            checks["store"] = f"job store not writable: {exc}"
        try:
            queue.ping()
            checks["broker"] = "ok"
        except RedisAuthenticationError as exc:
            checks["broker"] = (f"the broker refused the password ({type(exc).__name__}): set "
                                f"{REDIS_PASSWORD_VARIABLE} to the Redis server's password")
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            checks["broker"] = f"broker unreachable: {type(exc).__name__}: {exc}"
        try:
            catalog.resolve(None)
            checks["models"] = "ok"
        except BrainscanError as exc:
            available = [name for name in catalog.names() if name != settings.default_model]
            checks["models"] = "ok" if available else exc.message
        return {name: settings.redact(state) for name, state in checks.items()}

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def prometheus_metrics(metrics: MetricsDep) -> Response:
        # rendering reads the queue length from Redis: keep that (and its timeout) off the event loop
        return Response(await run_in_threadpool(metrics.render), media_type=metrics.content_type)

    return app


app = create_app()
