"""``/api/v1/segmentations``: the public face of the segmenter's job API.

Each route forwards to the segmenter (``/v1/jobs``) with the owner id the gateway decided
(:mod:`gateway.ownership`), never one from the client, and rewrites the segmenter's
``/v1/jobs/...`` URLs in JSON bodies and ``Location`` headers into this API's
``/api/v1/segmentations/...`` (under the app's ``root_path`` when it runs behind a prefix), so
that clients only ever see gateway URLs. Uploads stream through with a byte limit of their own;
files stream back with their content type and disposition.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from brainscan.api_models import SegmentationJob, SegmentationModels
from gateway.examples import (
    CREATE_SEGMENTATION_RESPONSES,
    DELETE_SEGMENTATION_RESPONSES,
    FILE_RESPONSES,
    GET_SEGMENTATION_RESPONSES,
    SEGMENTATION_BODY,
    SEGMENTATION_MODELS_RESPONSES,
)
from gateway.ownership import OWNER_HEADER, OwnerDep
from gateway.proxy import (
    MODEL_NAME_PATTERN,
    GatewayError,
    Upstream,
    check_declared_length,
    stream_limited_body,
)
from gateway.security import require_api_key
from gateway.settings import GatewaySettings

SEGMENTER_START_HINT = (" (uvicorn services.segmenter.app:app --port 8102, plus a worker: "
                        "celery -A services.segmenter.worker worker -Q segmentation)")
SEGMENTATION_UPLOAD_HINT = ("Upload the four scans as .nii.gz (compressed) files, or a zip of the case folder, "
                            "rather than uncompressed volumes; send a DICOM study as a zip of its four series only.")
UPSTREAM_JOBS_PREFIX = "/v1/jobs/"
PUBLIC_JOBS_PREFIX = "/api/v1/segmentations/"
# Job ids are secrets.token_urlsafe(16); file names are ones the job store wrote. Anything else is
# refused here, so that no odd path segment is ever forwarded.
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
# Headers of a file answer that a browser needs to save or show it as the segmenter meant.
_FILE_HEADERS = ("content-type", "content-disposition", "content-length", "content-encoding", "etag",
                 "last-modified", "cache-control")


def get_segmenter(request: Request) -> Upstream:
    """The segmenter client; a 503 when this gateway has no segmenter URL configured."""
    segmenter: Upstream | None = request.app.state.segmenter
    if segmenter is None:
        raise GatewayError(503, "service_unavailable",
                           "3D segmentation is not enabled on this server. The operator can enable it by setting "
                           "GATEWAY_SEGMENTER_URL to the segmenter's address.")
    return segmenter


SegmenterDep = Annotated[Upstream, Depends(get_segmenter)]


def rewrite_job_urls(value: Any, public_prefix: str, upstream_base: str = "") -> Any:
    """Replace the segmenter's job URLs in a decoded JSON value by the gateway's.

    Args:
        value: a decoded JSON value (dicts and lists are walked; other values are kept).
        public_prefix: what replaces ``"/v1/jobs/"``, e.g. ``"/api/v1/segmentations/"``.
        upstream_base: the segmenter's base URL; absolute URLs under it are rewritten as well.

    Returns:
        A copy of ``value`` where every string starting with ``/v1/jobs/`` (or
        ``<upstream_base>/v1/jobs/``) starts with ``public_prefix`` instead.

    Example::

        >>> rewrite_job_urls({"self": "/v1/jobs/abc"}, "/api/v1/segmentations/")
        {'self': '/api/v1/segmentations/abc'}
    """
    if isinstance(value, str):
        if upstream_base and value.startswith(upstream_base + UPSTREAM_JOBS_PREFIX):
            value = value[len(upstream_base):]
        if value.startswith(UPSTREAM_JOBS_PREFIX):
            return public_prefix + value[len(UPSTREAM_JOBS_PREFIX):]
        return value
    if isinstance(value, dict):
        return {key: rewrite_job_urls(item, public_prefix, upstream_base) for key, item in value.items()}
    if isinstance(value, list):
        return [rewrite_job_urls(item, public_prefix, upstream_base) for item in value]
    return value


def _public_prefix(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + PUBLIC_JOBS_PREFIX


def job_response(request: Request, segmenter: Upstream, response: httpx.Response) -> Response:
    """The segmenter's JSON answer (read) for the client: same status, gateway URLs.

    Raises:
        GatewayError: 502 for an unreadable answer or a 5xx (see :meth:`Upstream.json_body`).
    """
    if response.status_code == 204:
        return Response(status_code=204)
    body = segmenter.json_body(response)
    prefix = _public_prefix(request)
    headers = {}
    if "location" in response.headers:
        headers["Location"] = rewrite_job_urls(response.headers["location"], prefix, segmenter.base_url)
    if "retry-after" in response.headers:
        headers["Retry-After"] = response.headers["retry-after"]
    content = json.dumps(rewrite_job_urls(body, prefix, segmenter.base_url), separators=(",", ":")).encode()
    return Response(content, status_code=response.status_code, media_type="application/json", headers=headers)


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream body as sent (a .nii.gz stays gzipped, so Content-Length holds); always closed,
    also when the client goes away mid-download."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


def _check_job_id(job_id: str) -> None:
    if not _JOB_ID.match(job_id):
        raise GatewayError(404, "not_found", "No segmentation job with this id. Check the address; jobs expire "
                                             "after a day and are visible only to whoever started them.")


def build_segmentation_router() -> APIRouter:
    """The segmentation routes (mounted under ``/api``): the job's four, and the models list."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["segmentation"])

    @router.post("/segmentations", status_code=202, summary="Start a 3D tumour segmentation of one case",
                 response_model=SegmentationJob, responses=CREATE_SEGMENTATION_RESPONSES,
                 openapi_extra=SEGMENTATION_BODY,
                 description="Upload one case as multipart/form-data: the four scans as fields `t1`, `t1ce`, `t2`, "
                             "`flair` (NIfTI), or a zip as `case`, or one 4D NIfTI as `volume`, or a zip of a "
                             "DICOM study as `dicom` (plus, if the answer asks for it, a text field `series`: JSON "
                             "{SeriesInstanceUID: modality}); or, with no file, the text fields `pacs` (a PACS "
                             "the operator configured: its name, or exactly its DICOMweb URL) and `study_uid`: the "
                             "server pulls that study over DICOMweb and stores the SEG back in the PACS (the job's "
                             "`result.pacs` says whether that worked). A DICOM job's result adds `seg_url` (DICOM "
                             "SEG on the t1ce series) and `transforms_url`. Answers 202 with "
                             "the job; poll `GET` on its URL until `status` is `succeeded`, `failed` or "
                             "`cancelled`. Jobs (and their files) are visible only to the API key or browser "
                             "session that created them. Research software: not for clinical use.")
    async def create_segmentation(
        request: Request,
        owner: OwnerDep,
        segmenter: SegmenterDep,
        model: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN,
                                           description="Segmentation model name (default: the server's)")] = None,
    ) -> Response:
        settings: GatewaySettings = request.app.state.settings
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise GatewayError(415, "unsupported_media_type",
                               "Send the case as multipart/form-data: four files named t1, t1ce, t2 and flair, "
                               "or a zip named case, or one 4D NIfTI named volume, or a DICOM study zip named dicom "
                               "(`curl -F t1=@t1.nii.gz -F t1ce=@t1ce.nii.gz ...`), or the text fields pacs and "
                               "study_uid (`curl -F pacs=orthanc -F study_uid=1.2.840...`).")
        limit = settings.max_segmentation_upload_bytes
        check_declared_length(request, limit, SEGMENTATION_UPLOAD_HINT)
        headers = {"Content-Type": content_type, OWNER_HEADER: owner}
        if "content-length" in request.headers:
            headers["Content-Length"] = request.headers["content-length"]
        response = await segmenter.send("POST", "/v1/jobs", request_id=request.state.request_id,
                                        content=stream_limited_body(request, limit, SEGMENTATION_UPLOAD_HINT),
                                        headers=headers, params={"model": model} if model else None)
        return job_response(request, segmenter, response)

    @router.get("/segmentations/{job_id}", summary="Status, progress and result of a segmentation job",
                response_model=SegmentationJob, responses=GET_SEGMENTATION_RESPONSES)
    async def get_segmentation(request: Request, job_id: str, owner: OwnerDep, segmenter: SegmenterDep) -> Response:
        _check_job_id(job_id)
        response = await segmenter.send("GET", f"/v1/jobs/{job_id}", request_id=request.state.request_id,
                                        headers={OWNER_HEADER: owner})
        return job_response(request, segmenter, response)

    @router.get("/segmentations/{job_id}/files/{name}", summary="Download a file of a job (mask, inputs, previews)",
                response_class=Response, responses=FILE_RESPONSES)
    async def get_segmentation_file(request: Request, job_id: str, name: str, owner: OwnerDep,
                                    segmenter: SegmenterDep) -> Response:
        _check_job_id(job_id)
        if not _FILE_NAME.match(name):
            raise GatewayError(404, "not_found", f"This job has no file named {name!r}.")
        response = await segmenter.send("GET", f"/v1/jobs/{job_id}/files/{name}", stream=True,
                                        request_id=request.state.request_id,
                                        headers={OWNER_HEADER: owner, "Accept": "*/*"})
        if response.status_code != 200:
            try:
                await response.aread()
            finally:
                await response.aclose()
            return job_response(request, segmenter, response)
        headers = {key: response.headers[key] for key in _FILE_HEADERS if key in response.headers}
        return StreamingResponse(_relay(response), status_code=200, headers=headers)

    @router.delete("/segmentations/{job_id}", summary="Cancel a running job, or delete a finished one and its files",
                   response_model=SegmentationJob, responses=DELETE_SEGMENTATION_RESPONSES)
    async def delete_segmentation(request: Request, job_id: str, owner: OwnerDep,
                                  segmenter: SegmenterDep) -> Response:
        _check_job_id(job_id)
        response = await segmenter.send("DELETE", f"/v1/jobs/{job_id}", request_id=request.state.request_id,
                                        headers={OWNER_HEADER: owner})
        return job_response(request, segmenter, response)

    @router.get("/segmentation-models", summary="Segmentation models available",
                response_model=SegmentationModels, responses=SEGMENTATION_MODELS_RESPONSES)
    async def list_segmentation_models(request: Request, segmenter: SegmenterDep) -> Response:
        response = await segmenter.send("GET", "/v1/models", request_id=request.state.request_id)
        return job_response(request, segmenter, response)

    return router
