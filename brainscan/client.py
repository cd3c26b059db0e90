"""A small Python client of the brainscan gateway (``/api/v1``), without TensorFlow.

It classifies 2D slices, submits BraTS cases for segmentation, waits for the job with a progress
callback, downloads the mask and deletes the job. Transient failures (connection refused or reset,
502, 503, and 504 on idempotent requests) are retried with exponential backoff and jitter,
honouring ``Retry-After``; a 4xx is never retried. Every logical call carries one fresh
``X-Request-ID``, the same on each retry, so the server logs tie the attempts together.

Example:
    >>> with BrainscanClient("http://127.0.0.1:8000", api_key="secret") as client:
    ...     print(client.classify("scan.jpg")["label"])
    ...     job = client.wait(client.submit_segmentation("BraTS2021_00006"), timeout=600)
    ...     client.download_mask(job, "BraTS2021_00006_pred.nii.gz")
"""

from __future__ import annotations

import email.utils
import io
import json
import os
import random
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from brainscan.errors import BrainscanError
from brainscan.labels import BRATS2023, BRATS2023_MODALITIES, MODALITIES

#: Job states after which a job never changes again.
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
#: Statuses retried for every request; 504 only for idempotent ones (a POST may have been accepted).
RETRY_STATUSES = (502, 503)
IDEMPOTENT_METHODS = ("GET", "HEAD", "DELETE")
#: Longest wait between two attempts, whatever the backoff or ``Retry-After`` say.
MAX_RETRY_DELAY_S = 30.0


class ClientError(BrainscanError):
    """A request failed: the server's JSON error, or a transport failure.

    Attributes:
        status: HTTP status, or ``None`` when no answer came (``code`` ``"unreachable"``,
            ``"timeout"``) or the job itself failed (``"job_failed"``, ``"job_cancelled"``).
        code: the server's ``error`` code (e.g. ``"unsupported_format"``, ``"unauthorized"``).
        detail: the server's ``detail``: what was wrong and what to do.
        request_id: the ``X-Request-ID`` of the call, to find it in the server logs.
        job: the job body, for job failures and wait timeouts.
    """

    def __init__(self, status: int | None, code: str, detail: str, request_id: str | None = None,
                 job: dict[str, Any] | None = None) -> None:
        super().__init__(detail, code=code)
        self.status = status
        self.detail = detail
        self.request_id = request_id
        self.job = job
        self.http_status = status or 0


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds asked by a ``Retry-After`` header (delta-seconds or HTTP date), or ``None``."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_response(response: httpx.Response, request_id: str | None) -> ClientError:
    """The :class:`ClientError` of a non-2xx answer, from its JSON body when it has one."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"] if isinstance(body["detail"], str) else str(body["detail"])
        return ClientError(response.status_code, str(body.get("error") or f"http_{response.status_code}"),
                           detail, body.get("request_id") or request_id)
    text = response.text.strip()[:200] or response.reason_phrase
    return ClientError(response.status_code, f"http_{response.status_code}", text, request_id)


class BrainscanClient:
    """Client of one brainscan gateway.

    Args:
        base_url: the gateway, e.g. ``"http://127.0.0.1:8000"``.
        api_key: sent as ``X-API-Key`` when given (needed when the server has keys configured).
        timeout: seconds per HTTP request (not per job; see :meth:`wait`).
        retries: extra attempts after a transient failure (0 = no retry).
        backoff: first retry delay in seconds; doubled each attempt, with jitter.
        transport: an ``httpx`` transport (tests use ``httpx.MockTransport``).

    The underlying ``httpx.Client`` keeps cookies, so jobs stay visible through the gateway's
    session cookie even when the server has no API keys.

    Raises:
        ValueError: a bad ``base_url``, ``timeout``, ``retries`` or ``backoff``.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60, retries: int = 4,
                 backoff: float = 0.5, *, transport: httpx.BaseTransport | None = None) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
        self.base_url = base_url.rstrip("/")
        self.retries = int(retries)
        self.backoff = float(backoff)
        # Patchable so that tests (and callers with their own event loop) control the waiting.
        self.sleep: Callable[[float], None] = time.sleep
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> BrainscanClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport -------------------------------------------------------------------------------

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        asked = _retry_after(response) if response is not None else None
        if asked is not None:
            return min(asked, MAX_RETRY_DELAY_S)
        # "Equal jitter": at least half the exponential step, so retries spread out but still back off.
        step = self.backoff * (2 ** attempt)
        return min(step / 2 + random.uniform(0, step / 2), MAX_RETRY_DELAY_S)

    def request(self, method: str, url: str, *, expect: Sequence[int] = (200,), **kwargs: Any) -> httpx.Response:
        """One logical call with retries; returns the response or raises :class:`ClientError`.

        Args:
            method: HTTP method.
            url: path under the base URL (e.g. ``"/api/v1/models"``).
            expect: statuses that count as success.
            kwargs: passed to ``httpx.Client.request`` (``params``, ``files``...); bodies must be
                bytes, so that every attempt resends them whole.
        """
        method = method.upper()
        idempotent = method in IDEMPOTENT_METHODS
        request_id = uuid.uuid4().hex
        headers = {**kwargs.pop("headers", {}), "X-Request-ID": request_id}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, url, headers=headers, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure: Exception = exc  # nothing reached the server: safe to resend any request
            except httpx.TransportError as exc:
                if not idempotent:  # the server may have acted on it; resending could duplicate a job
                    raise ClientError(None, "unreachable",
                                      f"connection to {self.base_url} failed mid-request: {exc}", request_id) from exc
                failure = exc
            else:
                if response.status_code in expect:
                    return response
                transient = response.status_code in RETRY_STATUSES or (idempotent and response.status_code == 504)
                if not transient or last:
                    raise error_from_response(response, request_id)
                self.sleep(self._delay(attempt, response))
                continue
            if last:
                raise ClientError(None, "unreachable",
                                  f"cannot reach brainscan at {self.base_url} after {self.retries + 1} attempt(s): "
                                  f"{failure}; is the server running (brainscan up) and the URL right?",
                                  request_id) from failure
            self.sleep(self._delay(attempt, None))
        raise AssertionError("unreachable")  # the loop always returns or raises

    # -- API ----------------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        """``GET /api/v1/models``: the served classification and segmentation models."""
        return self.request("GET", "/api/v1/models").json()

    def classify(self, image: str | Path | bytes, model: str | None = None, explain: bool = False) -> dict[str, Any]:
        """Classify one 2D slice (JPEG, PNG, ...; recognised by content on the server).

        Args:
            image: a file path or the file's bytes.
            model: ``"resnet50"``, ``"vit_cnn"``... (default: the server's default).
            explain: also compute the heatmap (slower).

        Returns:
            The server's body: ``label``, ``probabilities``, ``model``, ``heatmap``, ``timings``...

        Raises:
            FileNotFoundError: ``image`` is a path that does not exist.
            ClientError: the server refused the image (4xx) or could not answer.
        """
        if isinstance(image, (bytes, bytearray)):
            name, raw = "image", bytes(image)
        else:
            name, raw = Path(image).name, Path(image).read_bytes()
        params = {"explain": "true" if explain else "false", **({"model": model} if model else {})}
        return self.request("POST", "/api/v1/classifications", params=params,
                            files={"file": (name, raw, "application/octet-stream")}).json()

    def submit_segmentation(self, source: str | Path | Sequence[str | Path] | Mapping[str, str | Path],
                            model: str | None = None, series: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Upload one BraTS case or DICOM study for segmentation; returns the queued job body.

        Args:
            source: a case folder (files found with :func:`brainscan.data.brats.find_case`; a
                BraTS 2023-2024 folder is sent under its t1n/t1c/t2w/t2f names, so its mask numbers
                enhancing tumour 3), four files in t1, t1ce, t2, flair order or a
                ``{modality: path}`` mapping, a ``.zip`` of a case folder, one 4D NIfTI
                ``(X, Y, Z, 4)`` with channels in that order, or a DICOM study: a folder (zipped
                here, in memory) or a zip, in any layout (:func:`brainscan.dicom.is_dicom_input`).
            model: ``"unet3d"``, ``"attention_unet3d"`` (default: the server's default).
            series: DICOM only: ``{SeriesInstanceUID: modality}`` for series the headers do not make
                clear (the server's 422 ``series_unidentified`` lists the series it found).

        Raises:
            MissingModalityError / DatasetLayoutError: the folder is not a BraTS case.
            ValueError: a sequence that is not four paths, or a mapping without every modality.
            ClientError: the server refused the case (4xx) or could not answer.
        """
        files: dict[str, tuple[str, bytes, str]]
        data = {"series": json.dumps(dict(series))} if series else None
        if isinstance(source, (str, Path)) and is_dicom_study(Path(source)):
            path = Path(source)
            raw = _zip_folder(path) if path.is_dir() else path.read_bytes()
            files = {"dicom": (path.name if path.is_file() else f"{path.name}.zip", raw, "application/zip")}
        elif series:
            raise ValueError("series maps the series of a DICOM study; give a DICOM folder or zip")
        elif isinstance(source, Mapping) or (isinstance(source, Sequence) and not isinstance(source, (str, bytes))):
            if isinstance(source, Mapping):
                missing = [m for m in MODALITIES if m not in source]
                if missing:
                    raise ValueError(f"modality files missing: {missing}; give all of {list(MODALITIES)}")
                paths = [Path(source[m]) for m in MODALITIES]
            else:
                if len(source) != len(MODALITIES):
                    raise ValueError(f"give {len(MODALITIES)} files in {list(MODALITIES)} order, got {len(source)}")
                paths = [Path(p) for p in source]
            files = {m: (p.name, p.read_bytes(), "application/octet-stream") for m, p in zip(MODALITIES, paths)}
        else:
            path = Path(source)
            if path.is_dir():
                from brainscan.data.brats import find_case

                case = find_case(path)
                # the server answers in the labels of the field names: BraTS 2023-2024 names for such a case
                field = ({m: name for name, m in BRATS2023_MODALITIES.items()} if case.label_convention == BRATS2023
                         else {m: m for m in MODALITIES})
                files = {field[m]: (p.name, p.read_bytes(), "application/octet-stream")
                         for m, p in case.modalities.items() if m in MODALITIES}
            else:
                raw = path.read_bytes()
                field = "case" if raw[:4] == b"PK\x03\x04" else "volume"
                files = {field: (path.name, raw, "application/octet-stream")}
        params = {"model": model} if model else None
        return self.request("POST", "/api/v1/segmentations", params=params, files=files, data=data,
                            expect=(200, 201, 202)).json()

    def submit_pacs_segmentation(self, pacs: str, study_uid: str, model: str | None = None,
                                 series: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Have the server pull a study from a PACS, segment it and store the DICOM SEG back there.

        The server contacts only the DICOMweb servers its operator configured: ``pacs`` names one
        of them (or is exactly its configured URL); any other value is a 422 ``unknown_pacs`` that
        lists the configured names. The study is pulled and checked before the job is queued, so a
        bad study is refused at once, as an upload would be; the final job's ``result.pacs`` says
        whether the SEG was stored (``status`` ``"stored"`` or ``"failed"`` with ``detail``).

        Args:
            pacs: the PACS's name on the server (or its exact DICOMweb URL).
            study_uid: the StudyInstanceUID.
            model: ``"unet3d"``, ``"attention_unet3d"`` (default: the server's default).
            series: ``{SeriesInstanceUID: modality}`` for series the headers do not make clear.

        Raises:
            ClientError: the server refused (``unknown_pacs``, ``study_not_found``, the study's
                own errors...) or could not reach the PACS (503 ``pacs_unreachable``).
        """
        fields: dict[str, tuple[None, str]] = {"pacs": (None, pacs), "study_uid": (None, study_uid)}
        if series:
            fields["series"] = (None, json.dumps(dict(series)))
        params = {"model": model} if model else None
        # text-only parts: still multipart/form-data, as the API takes every shape of input
        return self.request("POST", "/api/v1/segmentations", params=params, files=fields,
                            expect=(200, 201, 202)).json()

    def get_job(self, job_id: str) -> dict[str, Any]:
        """``GET /api/v1/segmentations/{id}``: the job body."""
        return self.request("GET", f"/api/v1/segmentations/{_job_id(job_id)}").json()

    def wait(self, job: str | Mapping[str, Any], progress: Callable[[dict[str, Any]], None] | None = None,
             timeout: float = 600, *, poll: float = 0.5, max_poll: float = 3.0,
             raise_on_failure: bool = True) -> dict[str, Any]:
        """Poll a job until it ends; the interval grows from ``poll`` to ``max_poll`` seconds.

        Args:
            job: the job id or body.
            progress: called with each polled job body (``status``, ``progress``, ``stage``,
                ``stage_detail``).
            timeout: seconds to wait in all.
            raise_on_failure: raise for a failed or cancelled job instead of returning it.

        Returns:
            The final job body.

        Raises:
            ClientError: code ``"timeout"`` when the job is still running after ``timeout``;
                ``"job_failed"`` / ``"job_cancelled"`` (with ``.job``); or a request failure.
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        job_id = _job_id(job)
        deadline = time.monotonic() + timeout
        interval = poll
        while True:
            body = self.get_job(job_id)
            if progress is not None:
                progress(body)
            if body.get("status") in TERMINAL_STATES:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(None, "timeout", f"job {job_id} still {body.get('status')} "
                                  f"({body.get('stage')}) after {timeout:g} s; it keeps running on the server",
                                  job=body)
            self.sleep(min(interval, left))
            interval = min(interval * 1.5, max_poll)
        if raise_on_failure and body["status"] != "succeeded":
            error = body.get("error") or {}
            detail = error.get("detail") or f"job {job_id} was {body['status']}"
            raise ClientError(None, "job_failed" if body["status"] == "failed" else "job_cancelled",
                              f"job {job_id} {body['status']}: {detail}", job=body)
        return body

    def download_mask(self, job: str | Mapping[str, Any], out_path: str | Path) -> Path:
        """Write the mask of a succeeded job to ``out_path`` (``.nii.gz``); returns the path.

        Raises:
            ClientError: code ``"no_result"`` when the job has no mask (not finished or failed).
        """
        return self.download_result(job, "mask_url", out_path)

    def download_result(self, job: str | Mapping[str, Any], key: str, out_path: str | Path) -> Path:
        """Write one output of a succeeded job to ``out_path``; returns the path.

        Args:
            job: the job id or body.
            key: the result's URL field: ``"mask_url"``, or for a DICOM job ``"seg_url"`` (the DICOM
                SEG) or ``"transforms_url"``.

        Raises:
            ClientError: code ``"no_result"`` when the job has no such output (not finished, failed,
                or not a DICOM job).
        """
        body = dict(job) if isinstance(job, Mapping) else self.get_job(job)
        result = body.get("result") or {}
        if not result.get(key):
            what = key.removesuffix("_url")
            raise ClientError(None, "no_result", f"job {body.get('id')} has no {what} (status {body.get('status')})",
                              job=body)
        raw = self.request("GET", result[key]).content
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".part")  # never leave a truncated mask under the real name
        partial.write_bytes(raw)
        os.replace(partial, out)
        return out

    def delete(self, job: str | Mapping[str, Any]) -> None:
        """Cancel a queued or running job, or delete a finished one."""
        self.request("DELETE", f"/api/v1/segmentations/{_job_id(job)}", expect=(200, 202, 204))


def is_dicom_study(path: Path) -> bool:
    """A DICOM study folder, or a zip without NIfTI members (a BraTS case zip holds NIfTI files)."""
    if path.is_dir():
        from brainscan.dicom.case import is_dicom_input

        return is_dicom_input(path)
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return not any(name.lower().endswith((".nii", ".nii.gz")) for name in archive.namelist())


def _zip_folder(folder: Path) -> bytes:
    """The files under ``folder`` (relative names, hidden ones left out) as an in-memory zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                archive.write(path, relative.as_posix())
    return buffer.getvalue()


def _job_id(job: str | Mapping[str, Any]) -> str:
    job_id = job.get("id") if isinstance(job, Mapping) else job
    if not isinstance(job_id, str) or not job_id or "/" in job_id:
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id
