"""The routes of the segmenter job API, as one :class:`fastapi.APIRouter`.

Handlers take their collaborators from ``request.app.state`` through FastAPI dependencies
(:func:`get_settings`, :func:`get_store`, :func:`get_queue`, :func:`get_catalog`, :func:`get_metrics`,
:func:`get_limits`), so :func:`services.segmenter.app.create_app` only builds that state, includes
:data:`router` and installs the error handlers; tests may override a dependency
(``app.dependency_overrides[get_queue]``). The routes and their bodies are listed in
:mod:`services.segmenter.app`.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

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
from brainscan.errors import BrainscanError, InputTooLargeError, InvalidInputError, UnsupportedFormatError
from serving.internal_auth import INTERNAL_TOKEN_HEADER, REDIS_PASSWORD_VARIABLE, is_internal_caller
from serving.web import error_response
from services.segmenter.broker import JobQueue, ServiceUnavailableError, require_broker
from services.segmenter.catalog import ModelCatalog
from services.segmenter.dicom_intake import PACS_FIELD, accept_pacs
from services.segmenter.intake import UPLOAD_FIELDS, IntakeLimits, UploadPart, accept_upload
from services.segmenter.job_record import Job, JobStatus
from services.segmenter.jobs import MODALITY_FILES, JobNotFoundError, JobStateError, is_owned_by, public_view
from services.segmenter.metrics import ServiceMetrics
from services.segmenter.settings import Settings
from services.segmenter.store import JobStore, check_file_name

OWNER_HEADER = "X-Brainscan-Owner"
#: owner ids are opaque (the gateway derives them), but they end up in logs and JSON
_OWNER = re.compile(r"^[A-Za-z0-9._:@+=/-]{1,256}$")
#: room for boundaries and part headers around the files themselves
MULTIPART_OVERHEAD = 64 * 1024
JOBS_PATH = "/v1/jobs"
MEDIA_TYPES = {".png": "image/png", ".gz": "application/gzip", ".dcm": "application/dicom",
               ".json": "application/json", ".zip": "application/zip"}

router = APIRouter()


class NotInternalCallerError(BrainscanError):
    """An owner header on a request the internal token did not authenticate (401)."""

    code = "unauthorized"
    http_status = 401


# -- dependencies -------------------------------------------------------------------------------


def _from_state(name: str) -> Callable[[Request], Any]:
    """A dependency answering ``request.app.state.<name>`` (what :func:`~services.segmenter.app.create_app` built)."""

    def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    dependency.__name__ = dependency.__qualname__ = f"get_{name}"
    return dependency


get_settings = _from_state("settings")
get_store = _from_state("store")
get_queue = _from_state("queue")
get_catalog = _from_state("catalog")
get_metrics = _from_state("metrics")
get_limits = _from_state("limits")


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
LimitsDep = Annotated[IntakeLimits, Depends(get_limits)]
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


def _owned_job(store: JobStore, job_id: str, owner: str) -> Job:
    """The job if ``owner`` owns it; another owner's job is indistinguishable from a missing one."""
    job = store.get(job_id)
    if not is_owned_by(job, owner):
        raise JobNotFoundError(f"no job {job_id!r}")
    return job


# -- routes -------------------------------------------------------------------------------------


# the upload is read as a stream (read_form bounds it), so its form is documented from a model
@router.post(JOBS_PATH, status_code=202, summary="Submit a segmentation job", response_model=SegmentationJob,
             responses=error_responses(400, 401, 404, 413, 415, 422, 503),
             openapi_extra=multipart_body(SegmentationUpload))
async def submit_job(
    request: Request,
    store: StoreDep,
    queue: QueueDep,
    catalog: CatalogDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    limits: LimitsDep,
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
            job_id, source = await run_in_threadpool(_intake, store, parts, texts, owner, model_info,
                                                      settings, limits)
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
            model_info: dict[str, Any], settings: Settings, limits: IntakeLimits) -> tuple[str, str]:
    """Validate the form (``intake`` or a PACS pull) in a staging folder and create the job; ``(id, source)``."""
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


@router.get(JOBS_PATH + "/{job_id}", summary="A job's status, progress and result", response_model=SegmentationJob,
            response_model_exclude_unset=True, responses=error_responses(400, 401, 404, 422))
async def get_job(job_id: str, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
    return public_view(await run_in_threadpool(_owned_job, store, job_id, owner))


@router.get(JOBS_PATH + "/{job_id}/files/{name}", summary="An input, or the mask / a preview of a finished job",
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
    if (name not in MODALITY_FILES and job.status is not JobStatus.SUCCEEDED) or not path.is_file():
        raise JobNotFoundError(f"job {job_id} has no file {name!r} (status {job.status})")
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"), filename=name)


@router.delete(JOBS_PATH + "/{job_id}", summary="Cancel a queued or running job, or delete a finished one",
               response_model=SegmentationJob, responses={200: {"description": "cancelled; the job body"},
                                                          204: {"description": "deleted"},
                                                          **error_responses(400, 401, 404, 422)})
async def delete_job(job_id: str, store: StoreDep, owner: OwnerDep, metrics: MetricsDep) -> Response:
    job = await run_in_threadpool(_owned_job, store, job_id, owner)
    if not job.status.is_final:
        try:
            job = await run_in_threadpool(lambda: store.transition(
                job_id, JobStatus.CANCELLED, expect_status={JobStatus.QUEUED, JobStatus.RUNNING},
                stage_detail="cancelled by the owner"))
            metrics.jobs_cancelled.inc()
            return JSONResponse(public_view(job))
        except JobStateError:
            pass  # it finished meanwhile: delete it like any finished job
    await run_in_threadpool(store.delete, job_id)
    return Response(status_code=204)


@router.get("/v1/models", summary="Segmentation models in the store", response_model=SegmentationModels,
            response_model_exclude_unset=True, responses=error_responses(401))
async def list_models(catalog: CatalogDep, settings: SettingsDep) -> dict[str, Any]:
    return {"default": settings.default_model, "models": await run_in_threadpool(catalog.describe)}


@router.get("/healthz", summary="Liveness: the process answers", response_model=Health,
            response_model_exclude_unset=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: job store writable, broker reachable, a segmentation bundle present",
            response_model=SegmenterReady, responses=error_responses(503))
async def readyz(request: Request, store: StoreDep, queue: QueueDep, catalog: CatalogDep,
                 settings: SettingsDep) -> JSONResponse:
    checks = await run_in_threadpool(_readiness, store, queue, catalog, settings)
    if all(check == "ok" for check in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    detail = "; ".join(f"{name}: {state}" for name, state in checks.items() if state != "ok")
    return error_response(request, 503, "not_ready", detail, checks=checks)


def _readiness(store: JobStore, queue: JobQueue, catalog: ModelCatalog, settings: Settings) -> dict[str, str]:
    """``store``, ``broker`` and ``models``: ``"ok"`` or what is wrong (secrets and paths redacted)."""
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


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    # rendering reads the queue length from Redis: keep that (and its timeout) off the event loop
    return Response(await run_in_threadpool(metrics.render), media_type=metrics.content_type)
