"""OpenAPI ``responses=`` of the gateway's routes: the models of their answers, with examples.

Kept apart from the routes so that the route modules stay readable; the examples follow the
service contracts in ``docs/CONTRACTS.md``. Every entry names the model of its body
(:mod:`brainscan.api_models`), so that ``/openapi.json`` is generated from the models; the
examples are what ``/docs`` shows next to each one.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter

from brainscan.api_models import (
    BINARY_SCHEMA,
    Classification,
    ClassificationModels,
    ClassificationUpload,
    ErrorBody,
    GatewayNotReady,
    GatewayReady,
    Health,
    SegmentationJob,
    SegmentationModels,
    SegmentationUpload,
    multipart_body,
)

_REQUEST_ID = "3f2b9c0e8d7a4e1f"


def error_example(code: str, detail: str) -> dict[str, Any]:
    """OpenAPI ``content`` of an error answer with this code and detail."""
    return {"application/json": {"example": {"error": code, "detail": detail, "request_id": _REQUEST_ID}}}


def error_doc(description: str, code: str, detail: str) -> dict[str, Any]:
    """A ``responses=`` entry of an error: :class:`ErrorBody`, with an example of this code and detail."""
    return {"model": ErrorBody, "description": description, "content": error_example(code, detail)}


def body_doc(model: type[BaseModel], description: str, example: Any) -> dict[str, Any]:
    """A ``responses=`` entry of a JSON answer: ``model``, with one example."""
    return {"model": model, "description": description, "content": {"application/json": {"example": example}}}


HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: body_doc(Health, "The gateway answers", {"status": "ok", "service": "gateway", "version": "1.0.0"}),
}
READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: body_doc(GatewayReady, "Every configured service is ready", {
        "status": "ready", "services": {"classifier": {"status": "ready", "detail": "The classifier is ready."},
                                        "segmenter": {"status": "not configured", "detail": "..."}}}),
    503: body_doc(GatewayNotReady, "At least one configured service is not ready", {
        "status": "not ready", "error": "service_unavailable", "detail": "Not ready: classifier.",
        "request_id": _REQUEST_ID, "services": {"classifier": {"status": "unreachable", "detail": "..."}}}),
}


CLASSIFICATION_EXAMPLE = {
    "label": "glioma",
    "probabilities": {"glioma": 0.91, "meningioma": 0.03, "notumor": 0.02, "pituitary": 0.04},
    "model": {"name": "resnet50", "arch": "resnet50", "version": "1", "demo": False, "tta": ["flip_lr"],
              "temperature": 1.21},
    "heatmap": {"method": "grad-cam-stage2", "image_png": "data:image/png;base64,iVBORw0KGgo...",
                "overlay_png": "data:image/png;base64,iVBORw0KGgo..."},
    "image": {"width": 512, "height": 512, "format": "jpeg"},
    "timings": {"decode_ms": 3.1, "queue_ms": 0.4, "inference_ms": 58.2, "explain_ms": 71.0, "total_ms": 134.9},
    "request_id": "3f2b9c0e8d7a4e1f",
}
MODELS_EXAMPLE = {
    "default": "resnet50",
    "models": [{"name": "resnet50", "arch": "resnet50", "version": "1", "demo": False,
                "classes": ["glioma", "meningioma", "notumor", "pituitary"], "input_size": 224,
                "metrics": {"accuracy": 0.95, "macro_f1": 0.94}, "created_at": "2026-11-27T12:00:00Z",
                "manifest": {}}],
}
_INVALID_REQUEST = error_doc("A parameter is not valid", "invalid_request",
                             "The request is not valid (query.model: String should match pattern). "
                             "See /docs for the expected parameters.")
CLASSIFIER_ERRORS: dict[int | str, dict[str, Any]] = {
    401: error_doc("Missing or wrong X-API-Key (only when the server has keys configured)",
                   "unauthorized", "This gateway needs an API key. Send it in the X-API-Key header."),
    422: _INVALID_REQUEST,
    502: error_doc("The service answered something unreadable",
                   "bad_gateway", "The connection to the classifier service broke. Try again."),
    503: error_doc("The service is not running, or the model asked for is not loaded (model_unavailable)",
                   "service_unavailable", "The classifier service is not reachable right now. Try again in a minute."),
    504: error_doc("The service did not answer in time",
                   "upstream_timeout", "The classifier service took too long to answer. Try again."),
}
MODELS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: body_doc(ClassificationModels, "Models and the default one", MODELS_EXAMPLE),
    **CLASSIFIER_ERRORS,
}
CLASSIFY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **CLASSIFIER_ERRORS,
    200: body_doc(Classification, "Predicted class, probabilities, heatmap and timings", CLASSIFICATION_EXAMPLE),
    400: error_doc("Empty upload", "empty_input", "The uploaded file is empty."),
    404: error_doc("Unknown model", "unknown_model", "No model named 'x'."),
    413: error_doc("Upload over the size limit",
                   "too_large", "The upload is larger than this server accepts (20.1 MB)."),
    415: error_doc("Not an image (decided by content) or not multipart/form-data",
                   "unsupported_format", "The file is not a JPEG or PNG image."),
    422: error_doc("Corrupt image or absurd dimensions, or a parameter that is not valid",
                   "corrupt_file", "The image is truncated or damaged."),
}
CLASSIFY_BODY = multipart_body(ClassificationUpload)


# ---------------------------------------------------------------- segmentation

_JOB_ID = "q3Xo1c9v2Jx0Jm4nYb7tGw"
_JOB_URL = f"/api/v1/segmentations/{_JOB_ID}"
SEGMENTATION_JOB_EXAMPLE = {
    "id": _JOB_ID, "status": "running", "progress": 0.42, "stage": "inference", "stage_detail": "patch 8 of 18",
    "error": None, "created_at": "2026-11-27T12:00:00Z", "started_at": "2026-11-27T12:00:01Z",
    "finished_at": None, "expires_at": "2026-11-28T12:00:00Z",
    "model": {"name": "unet3d", "arch": "unet3d", "version": "1", "demo": False},
    "input": {"shape": [240, 240, 155], "spacing_mm": [1.0, 1.0, 1.0], "source": "files"},
    "links": {"self": _JOB_URL, "inputs": {m: f"{_JOB_URL}/files/input_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")}},
    "result": None,
}
SEGMENTATION_DONE_EXAMPLE = {
    **SEGMENTATION_JOB_EXAMPLE, "status": "succeeded", "progress": 1.0, "stage": "done", "stage_detail": None,
    "finished_at": "2026-11-27T12:00:19Z",
    "result": {"mask_url": f"{_JOB_URL}/files/mask.nii.gz",
               "volumes_ml": {"WT": 61.2, "TC": 24.8, "ET": 14.1, "NCR": 10.7, "ED": 36.4},
               "previews": {plane: f"{_JOB_URL}/files/preview_{plane}.png" for plane in ("axial", "coronal", "sagittal")},
               "labels": {"1": "NCR", "2": "ED", "4": "ET"},
               "tumour_centre": {"voxel": [152, 131, 84], "mm": [-152.0, 108.0, 84.0]}},
}
SEGMENTER_ERRORS: dict[int | str, dict[str, Any]] = {
    401: CLASSIFIER_ERRORS[401],
    422: _INVALID_REQUEST,
    502: error_doc("The segmenter answered something unreadable",
                   "bad_gateway", "The connection to the segmenter service broke. Try again."),
    503: error_doc("The segmenter is not running or not configured, or its queue is unreachable",
                   "service_unavailable", "The segmenter service is not reachable right now. Try again in a minute."),
    504: error_doc("The segmenter did not answer in time",
                   "upstream_timeout", "The segmenter service took too long to answer. Try again."),
}
_NOT_FOUND = error_doc("No such job for this owner (another session's or API key's jobs are invisible), or it expired",
                       "not_found", "No segmentation job with this id. It may have expired.")
CREATE_SEGMENTATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **SEGMENTER_ERRORS,
    202: {**body_doc(SegmentationJob,
                     "Accepted and queued; poll the `Location` (also `links.self`) until `status` is final",
                     {**SEGMENTATION_JOB_EXAMPLE, "status": "queued", "progress": 0.0, "stage": "queued",
                      "stage_detail": None, "started_at": None}),
          "headers": {"Location": {"description": "URL of the job", "schema": TypeAdapter(str).json_schema()}}},
    400: error_doc("Empty file or malformed form", "empty_input", "The file for 't1' is empty."),
    404: error_doc("Unknown model", "unknown_model", "No model named 'x'."),
    413: error_doc("Upload over the gateway's or the segmenter's size limit",
                   "too_large", "The upload is larger than this server accepts (600.0 MB)."),
    415: error_doc("Not multipart/form-data, or a file that is not NIfTI / zip (decided by content)",
                   "unsupported_format", "The file for 't1' is not a NIfTI image."),
    422: error_doc("A modality is missing, the volumes disagree (shape/affine), a file is corrupt, or a parameter "
                   "is not valid", "missing_modality",
                   "The case has no 'flair' scan. Upload t1, t1ce, t2 and flair."),
}
GET_SEGMENTATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": SegmentationJob,
          "description": "The job: status, progress, and once succeeded the mask URL, volumes (mL) and previews",
          "content": {"application/json": {"examples": {
              "running": {"value": SEGMENTATION_JOB_EXAMPLE}, "succeeded": {"value": SEGMENTATION_DONE_EXAMPLE},
              "failed": {"value": {**SEGMENTATION_JOB_EXAMPLE, "status": "failed", "stage": "inference",
                                   "error": {"error": "inference_failed",
                                             "detail": "The model failed on this case. Try again later."}}}}}}},
    404: _NOT_FOUND,
    **SEGMENTER_ERRORS,
}
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file, streamed: `mask.nii.gz` (uint8 BraTS labels 0/1/2/4, the input's grid and "
                         "affine), `input_<modality>.nii.gz`, or `preview_<plane>.png`",
          "content": {"application/gzip": {"schema": BINARY_SCHEMA}, "image/png": {"schema": BINARY_SCHEMA}}},
    404: error_doc(_NOT_FOUND["description"], "not_found", "This job has no file named 'x'."),
    **SEGMENTER_ERRORS,
}
DELETE_SEGMENTATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: body_doc(SegmentationJob, "A queued or running job was cancelled (its body, status `cancelled`)",
                  {**SEGMENTATION_JOB_EXAMPLE, "status": "cancelled"}),
    204: {"description": "A finished job and its files were deleted"},
    404: _NOT_FOUND,
    **SEGMENTER_ERRORS,
}
SEGMENTATION_BODY = multipart_body(SegmentationUpload)
SEGMENTATION_MODELS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: body_doc(SegmentationModels, "Segmentation models (from their bundles' manifests) and the default one", {
        "default": "unet3d",
        "models": [{"name": "unet3d", "arch": "unet3d", "version": "2", "demo": False, "versions": ["1", "2"],
                    "label_map": {"0": 0, "1": 1, "2": 2, "3": 4},
                    "label_names": {"0": "background", "1": "NCR", "2": "ED", "3": "ET"},
                    "modalities": ["t1", "t1ce", "t2", "flair"],
                    "metrics": {"dice": {"WT": 0.87, "TC": 0.90, "ET": 0.60}}}]}),
    **SEGMENTER_ERRORS,
}
