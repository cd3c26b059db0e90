"""Pydantic models of the JSON bodies of the HTTP APIs (gateway, classifier and segmenter services).

The routes declare them as ``response_model`` (and in ``responses=``) so that ``/openapi.json``
is generated from them; the contracts they describe are in ``docs/CONTRACTS.md``. Every model
allows extra keys, so that a body that grows a key stays valid, and routes that hand FastAPI a
dict use ``response_model_exclude_unset=True``: the JSON sent is the dict the route built.

Multipart uploads are read as streams by the services (to bound them), so FastAPI cannot
generate their request schema from parameters; :func:`multipart_body` generates it from a model
(:class:`SegmentationUpload`, :class:`ClassificationUpload`) instead.

Only pydantic is needed here: the gateway, which imports this module, has no other dependency.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

#: OpenAPI schema of a binary answer or form part (generated, not written by hand)
BINARY_SCHEMA: dict[str, Any] = TypeAdapter(bytes).json_schema()


class Body(BaseModel):
    """Base of every body: extra keys are kept (the contracts may add keys)."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- errors and probes


class ErrorBody(Body):
    """Every failure: ``{"error", "detail", "request_id", ...}`` (some errors add keys, e.g. ``series``)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"error": "not_found", "detail": "No segmentation job with this id.", "request_id": "3f2b9c0e8d7a4e1f"}]})
    error: str = Field(description="a stable machine-readable code, e.g. too_large or unknown_model")
    detail: str = Field(description="what went wrong and what to do about it")
    request_id: str | None = Field(description="the request's id (X-Request-ID), also in the logs")


class Health(Body):
    """Liveness: the process answers (the gateway adds its name and version)."""

    status: str = Field(examples=["ok"])
    service: str | None = None
    version: str | None = None


class ServiceProbe(Body):
    """One service as the gateway's ``/api/ready`` sees it."""

    status: str = Field(description="ready, not ready, unreachable or not configured")
    detail: str


class GatewayReady(Body):
    """``/api/ready`` when every configured service is ready."""

    status: str = Field(examples=["ready"])
    services: dict[str, ServiceProbe]


class GatewayNotReady(ErrorBody):
    """``/api/ready`` (503) when a configured service is not ready."""

    status: str = Field(examples=["not ready"])
    services: dict[str, ServiceProbe]


class ClassifierReady(Body):
    """The classifier's ``/readyz``: the loaded models, and those missing or failed."""

    status: str = Field(examples=["ready"])
    ready: bool
    models: dict[str, str] = Field(description="name -> bundle version")
    missing: dict[str, str]
    failed: dict[str, str]


class SegmenterReady(Body):
    """The segmenter's ``/readyz``: one check per dependency, ``ok`` or why not."""

    status: str = Field(examples=["ready"])
    checks: dict[str, str] = Field(examples=[{"store": "ok", "broker": "ok", "models": "ok"}])


# ---------------------------------------------------------------- classification


class ModelRef(Body):
    """The model that answered."""

    name: str
    arch: str
    version: str
    demo: bool


class ClassifierModelRef(ModelRef):
    """The classification model that answered, with its test-time augmentations and calibration."""

    tta: list[str]
    temperature: float | None


class Heatmap(Body):
    """Where the model looked: the heatmap alone and over the slice, as PNG data URLs."""

    method: str
    image_png: str
    overlay_png: str


class ImageInfo(Body):
    """The uploaded image as decoded."""

    width: int
    height: int
    format: str


class Classification(Body):
    """``POST /v1/classify`` (and the gateway's ``/api/v1/classifications``)."""

    label: str = Field(description="the predicted class")
    probabilities: dict[str, float] = Field(description="class -> probability, all classes")
    model: ClassifierModelRef
    heatmap: Heatmap | None = Field(description="null with explain=false")
    image: ImageInfo
    timings: dict[str, float] = Field(description="milliseconds per stage")
    request_id: str | None


class ClassificationModel(Body):
    """A loaded classification model and its manifest."""

    name: str
    arch: str
    version: str
    demo: bool
    classes: list[str]
    input_size: int
    metrics: dict[str, Any]
    created_at: str | None
    manifest: dict[str, Any]


class ClassificationModels(Body):
    """``GET /v1/models`` of the classifier."""

    default: str
    models: list[ClassificationModel]


class ClassificationUpload(BaseModel):
    """The multipart form of a classification."""

    file: bytes = Field(description="One 2D MRI slice (JPEG or PNG)")


# ---------------------------------------------------------------- segmentation


class SegmentationModel(Body):
    """A segmentation model in the store; an unusable one has only ``name`` and ``error``."""

    name: str
    arch: str | None = None
    version: str | None = None
    demo: bool | None = None
    error: str | None = Field(default=None, description="why the bundle cannot be used")


class SegmentationModels(Body):
    """``GET /v1/models`` of the segmenter (and the gateway's ``/api/v1/segmentation-models``)."""

    default: str
    models: list[SegmentationModel]


class JobLinks(Body):
    """URLs of the job and of its input volumes."""

    self: str
    inputs: dict[str, str]


class TumourCentre(Body):
    """The whole tumour's centre of mass: where the previews' three planes cross and the page's viewer opens."""

    voxel: list[int] = Field(description="voxel indices (i, j, k) on the mask's grid, in the file's axis order")
    mm: list[float] = Field(description="world coordinates (x, y, z) in mm: the mask's affine applied to voxel "
                            "(NIfTI RAS+ scanner space)")


class JobResult(Body):
    """A succeeded job's outputs; a DICOM job adds ``seg_url`` and ``transforms_url``, a PACS job ``pacs``."""

    mask_url: str
    volumes_ml: dict[str, float] = Field(description="region -> volume in mL")
    previews: dict[str, str] = Field(description="plane -> PNG URL")
    labels: dict[str, str] = Field(description="label value -> region")
    tumour_centre: TumourCentre | None = Field(default=None, description="the tumour's centre of mass; null when "
                                               "nothing was segmented")
    precision: str | None = Field(default=None, description="the arithmetic the network ran in: float32 or "
                                  "bfloat16 (SEGMENTER_PRECISION)")


class SegmentationJob(Body):
    """A segmentation job: status, progress, and once succeeded its result."""

    id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    progress: float | None
    stage: str | None
    stage_detail: str | None
    error: dict[str, Any] | None = Field(description="a failed job's {error, detail}")
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    expires_at: str | None
    model: dict[str, Any] | None
    input: dict[str, Any] | None
    links: JobLinks
    result: JobResult | None


def _part(description: str) -> Any:
    return Field(default=None, description=description)


class SegmentationUpload(BaseModel):
    """The multipart form of a segmentation job."""

    model_config = ConfigDict(json_schema_extra={"description": (
        "Send ONE of: the four files t1, t1ce, t2 and flair (or the BraTS 2023-2024 names t1n, t1c, t2w, t2f; "
        "their mask numbers enhancing tumour 3, not 4); or `case`; or `volume`; or `dicom` (with `series` if "
        "asked for it); or `pacs` and `study_uid`.")})
    t1: bytes = _part("T1-weighted volume (.nii or .nii.gz)")
    t1ce: bytes = _part("Contrast-enhanced T1 volume")
    t2: bytes = _part("T2-weighted volume")
    flair: bytes = _part("FLAIR volume")
    t1n: bytes = _part("BraTS 2023-2024 name of the t1 volume")
    t1c: bytes = _part("BraTS 2023-2024 name of the t1ce volume")
    t2w: bytes = _part("BraTS 2023-2024 name of the t2 volume")
    t2f: bytes = _part("BraTS 2023-2024 name of the flair volume")
    case: bytes = _part("A zip of one BraTS case folder (<case>_{t1,t1ce,t2,flair}.nii[.gz], or the "
                        "2023-2024 <case>-<t1n|t1c|t2w|t2f>.nii.gz)")
    volume: bytes = _part("One 4D NIfTI (X, Y, Z, 4), channels t1, t1ce, t2, flair")
    dicom: bytes = _part("A zip of one skull-stripped DICOM MR study (any folder layout) with t1, t1ce, "
                         "t2 and flair series; the job also gives a DICOM SEG (seg.dcm) on the t1ce series "
                         "and transforms.json")
    series: str = _part("With `dicom` only: JSON {SeriesInstanceUID: modality} for series the headers "
                        "do not make clear (a 422 `series_unidentified` lists the series found)")
    pacs: str = _part("Instead of files: a PACS the operator configured (its name, or exactly its "
                      "DICOMweb URL); the server pulls the study `study_uid` from it and stores the SEG back")
    study_uid: str = _part("With `pacs`: the StudyInstanceUID")


# ---------------------------------------------------------------- OpenAPI helpers


def multipart_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its multipart body itself: the form schema of ``model``."""
    return {"requestBody": {"required": True,
                            "content": {"multipart/form-data": {"schema": model.model_json_schema()}}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries answering :class:`ErrorBody` for these statuses (422 replaces FastAPI's own)."""
    return {status: {"model": ErrorBody, "description": HTTPStatus(status).phrase} for status in statuses}
