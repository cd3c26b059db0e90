"""OpenAPI examples of the gateway's answers (what ``/docs`` shows next to each route).

Kept apart from the routes so that the route modules stay readable; the examples follow the
service contracts in ``docs/CONTRACTS.md``.
"""

from __future__ import annotations

from typing import Any

def error_example(code: str, detail: str) -> dict[str, Any]:
    """OpenAPI ``content`` of an error answer with this code and detail."""
    return {"application/json": {"example": {"error": code, "detail": detail, "request_id": "3f2b9c0e8d7a4e1f"}}}


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
CLASSIFIER_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong X-API-Key (only when the server has keys configured)",
          "content": error_example("unauthorized", "This gateway needs an API key. Send it in the X-API-Key header.")},
    502: {"description": "The service answered something unreadable",
          "content": error_example("bad_gateway", "The connection to the classifier service broke. Try again.")},
    503: {"description": "The service is not running, or the model asked for is not loaded (model_unavailable)",
          "content": error_example("service_unavailable", "The classifier service is not reachable right now. "
                                                           "Try again in a minute.")},
    504: {"description": "The service did not answer in time",
          "content": error_example("upstream_timeout", "The classifier service took too long to answer. Try again.")},
}
CLASSIFY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Predicted class, probabilities, heatmap and timings",
          "content": {"application/json": {"example": CLASSIFICATION_EXAMPLE}}},
    400: {"description": "Empty upload", "content": error_example("empty_input", "The uploaded file is empty.")},
    404: {"description": "Unknown model", "content": error_example("unknown_model", "No model named 'x'.")},
    413: {"description": "Upload over the size limit",
          "content": error_example("too_large", "The upload is larger than this server accepts (20.1 MB).")},
    415: {"description": "Not an image (decided by content) or not multipart/form-data",
          "content": error_example("unsupported_format", "The file is not a JPEG or PNG image.")},
    422: {"description": "Corrupt image or absurd dimensions",
          "content": error_example("corrupt_file", "The image is truncated or damaged.")},
    **CLASSIFIER_ERRORS,
}
CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["file"],
                       "properties": {"file": {"type": "string", "format": "binary",
                                               "description": "One 2D MRI slice (JPEG or PNG)"}}}}},
    }
}


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
               "labels": {"1": "NCR", "2": "ED", "4": "ET"}},
}
SEGMENTER_ERRORS: dict[int | str, dict[str, Any]] = {
    401: CLASSIFIER_ERRORS[401],
    502: {"description": "The segmenter answered something unreadable",
          "content": error_example("bad_gateway", "The connection to the segmenter service broke. Try again.")},
    503: {"description": "The segmenter is not running or not configured, or its queue is unreachable",
          "content": error_example("service_unavailable", "The segmenter service is not reachable right now. "
                                                          "Try again in a minute.")},
    504: {"description": "The segmenter did not answer in time",
          "content": error_example("upstream_timeout", "The segmenter service took too long to answer. Try again.")},
}
_NOT_FOUND = {"description": "No such job for this owner (another session's or API key's jobs are invisible), "
                             "or it expired",
              "content": error_example("not_found", "No segmentation job with this id. It may have expired.")}
CREATE_SEGMENTATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "Accepted and queued; poll the `Location` (also `links.self`) until `status` is final",
          "content": {"application/json": {"example": {**SEGMENTATION_JOB_EXAMPLE, "status": "queued",
                                                       "progress": 0.0, "stage": "queued", "stage_detail": None,
                                                       "started_at": None}}},
          "headers": {"Location": {"description": "URL of the job", "schema": {"type": "string"}}}},
    400: {"description": "Empty file or malformed form",
          "content": error_example("empty_input", "The file for 't1' is empty.")},
    404: {"description": "Unknown model", "content": error_example("unknown_model", "No model named 'x'.")},
    413: {"description": "Upload over the gateway's or the segmenter's size limit",
          "content": error_example("too_large", "The upload is larger than this server accepts (600.0 MB).")},
    415: {"description": "Not multipart/form-data, or a file that is not NIfTI / zip (decided by content)",
          "content": error_example("unsupported_format", "The file for 't1' is not a NIfTI image.")},
    422: {"description": "A modality is missing, the volumes disagree (shape/affine), or a file is corrupt",
          "content": error_example("missing_modality", "The case has no 'flair' scan. Upload t1, t1ce, t2 and flair.")},
    **SEGMENTER_ERRORS,
}
GET_SEGMENTATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The job: status, progress, and once succeeded the mask URL, volumes (mL) and previews",
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
          "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}},
                      "image/png": {"schema": {"type": "string", "format": "binary"}}}},
    404: {**_NOT_FOUND, "content": error_example("not_found", "This job has no file named 'x'.")},
    **SEGMENTER_ERRORS,
}
DELETE_SEGMENTATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A queued or running job was cancelled (its body, status `cancelled`)",
          "content": {"application/json": {"example": {**SEGMENTATION_JOB_EXAMPLE, "status": "cancelled"}}}},
    204: {"description": "A finished job and its files were deleted"},
    404: _NOT_FOUND,
    **SEGMENTER_ERRORS,
}
_NIFTI = {"type": "string", "format": "binary"}
SEGMENTATION_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {
            "schema": {"type": "object", "description": "Send ONE of: the four files t1, t1ce, t2 and flair; "
                                                        "or `case`; or `volume`; or `dicom` (with `series` "
                                                        "if asked for it); or `pacs` and `study_uid`.",
                       "properties": {
                           "t1": {**_NIFTI, "description": "T1-weighted volume (.nii or .nii.gz)"},
                           "t1ce": {**_NIFTI, "description": "Contrast-enhanced T1 volume"},
                           "t2": {**_NIFTI, "description": "T2-weighted volume"},
                           "flair": {**_NIFTI, "description": "FLAIR volume"},
                           "case": {**_NIFTI, "description": "A zip of one BraTS case folder "
                                                             "(<case>_{t1,t1ce,t2,flair}.nii[.gz])"},
                           "volume": {**_NIFTI, "description": "One 4D NIfTI (X, Y, Z, 4), channels t1, t1ce, t2, flair"},
                           "dicom": {**_NIFTI, "description": "A zip of one skull-stripped DICOM MR study (any "
                                                              "folder layout) with t1, t1ce, t2 and flair series; "
                                                              "the job also gives a DICOM SEG (seg.dcm) on the t1ce "
                                                              "series"},
                           "series": {"type": "string", "description": "With `dicom` only: JSON "
                                      "{SeriesInstanceUID: modality} for series the headers do not make clear "
                                      "(a 422 `series_unidentified` lists the series found)"},
                           "pacs": {"type": "string", "description": "Instead of files: a PACS the operator "
                                    "configured (its name, or exactly its DICOMweb URL); the server pulls the study "
                                    "`study_uid` from it and stores the SEG back"},
                           "study_uid": {"type": "string", "description": "With `pacs`: the StudyInstanceUID"},
                       }}}},
    }
}
SEGMENTATION_MODELS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Segmentation models (from their bundles' manifests) and the default one",
          "content": {"application/json": {"example": {
              "default": "unet3d",
              "models": [{"name": "unet3d", "arch": "unet3d", "version": "1", "demo": False,
                          "labels": {"1": "NCR", "2": "ED", "4": "ET"},
                          "metrics": {"dice_WT": 0.88, "dice_TC": 0.81, "dice_ET": 0.76}}]}}}},
    **SEGMENTER_ERRORS,
}
