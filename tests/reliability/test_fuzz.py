"""Property-based fuzzing of the public gateway in front of the REAL services: the classifier service
(uvicorn subprocess, tiny seeded bundle) and the segmenter API (uvicorn subprocess on a real
redis-server; no worker is needed, nothing valid reaches it but the final good request).

Malformed input of every kind (random bytes as images, NIfTI-like byte strings: gzip of random
bytes, truncated real headers, real headers with absurd dimensions or data types; random
multipart field names, query values, job ids, file names, X-Request-ID and X-API-Key headers)
must never produce a 5xx, every 4xx body must be JSON with ``error`` and ``detail``, and afterwards
both services are alive and a good request still succeeds.
"""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brainscan.labels import MODALITIES
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.bundles import make_classifier_store
from tests.redis_server import needs_redis, redis_server
from tests.segmenter import case_files, nifti_bytes
from tests.servers import INTERNAL_TOKEN, RunningServer, serve_uvicorn

pytestmark = [needs_redis, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

API_KEY = "fuzz-key-1"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


#: status codes the properties saw (the last test checks they reached the services, not only 401)
SEEN: Counter[int] = Counter()


@dataclass
class Services:
    gateway: TestClient
    classifier: RunningServer
    segmenter: RunningServer


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    from tests.segmenter import make_segmenter_store

    root = tmp_path_factory.mktemp("fuzz")
    classifiers = make_classifier_store(root / "classifiers")  # both: the fuzz asks for either by name
    segmenters = make_segmenter_store(root / "segmenters", patch_size=(32, 32, 32), overlap=0.5)
    with redis_server(root / "redis") as redis, \
            serve_uvicorn("services.classifier.app:app", ready_path="/readyz", log_dir=root,
                          env={"BRAINSCAN_MODELS": str(classifiers), "CLASSIFIER_LOG_LEVEL": "WARNING"}) as classifier, \
            serve_uvicorn("services.segmenter.app:app", ready_path="/readyz", log_dir=root,
                          env={"BRAINSCAN_MODELS": str(segmenters), "SEGMENTER_BROKER_URL": redis.url,
                               "SEGMENTER_JOBS_DIR": str(root / "jobs"), "SEGMENTER_LOG_LEVEL": "WARNING",
                               "SEGMENTER_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024)}) as segmenter:
        # wrong-key throttling off: one client sends every fuzzed key here, and after ten wrong ones the
        # rest would never get past the key check (throttling has its own tests: tests/gateway/test_security.py)
        gateway_settings = GatewaySettings(classifier_url=classifier.url, segmenter_url=segmenter.url,
                                           api_keys=API_KEY, api_key_max_failures=0, log_level="WARNING",
                                           internal_token=INTERNAL_TOKEN)
        with TestClient(create_app(gateway_settings), raise_server_exceptions=False) as client:
            yield Services(client, classifier, segmenter)


def check(response, services: Services) -> None:
    """No 5xx; a 4xx answers JSON ``{"error", "detail", ...}``."""
    SEEN[response.status_code] += 1
    where = f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where + "\n--- classifier ---\n" + services.classifier.log_tail(1500) + \
        "\n--- segmenter ---\n" + services.segmenter.log_tail(1500)
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("detail"), str), where


# -- strategies ---------------------------------------------------------------------------------

ascii_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
junk_headers = st.fixed_dictionaries({
    # mostly the right key, so that most requests get past the key check to the services
    "X-API-Key": st.one_of(st.just(API_KEY), st.just(API_KEY), st.just(API_KEY), ascii_text),
}, optional={
    "X-Request-ID": ascii_text,
    "X-Brainscan-Owner": ascii_text,  # a client may not choose its owner: the gateway replaces it
})
field_names = st.one_of(st.sampled_from(["file", "image", *MODALITIES, "case", "volume", "seg"]),
                        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                                       exclude_characters='"\\'), min_size=1, max_size=20))
file_names = st.one_of(st.sampled_from(["slice.png", "x.jpg", "t1.nii.gz", "a.nii", "case.zip", ""]), ascii_text)

_REAL_NIFTI = nifti_bytes(np.zeros((8, 8, 8), np.int16), gz=False)


def _absurd_header(dims: list[int], datatype: int, bitpix: int) -> bytes:
    """A real NIfTI-1 header with ``dim`` / ``datatype`` / ``bitpix`` overwritten (little-endian)."""
    raw = bytearray(_REAL_NIFTI)
    struct.pack_into("<8h", raw, 40, *dims)
    struct.pack_into("<hh", raw, 70, datatype, bitpix)
    return bytes(raw)


nifti_like = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=600).map(gzip.compress),
    st.integers(0, len(_REAL_NIFTI) - 1).map(lambda n: _REAL_NIFTI[:n]),
    st.integers(0, len(_REAL_NIFTI) - 1).map(lambda n: gzip.compress(_REAL_NIFTI[:n])),
    st.builds(_absurd_header, st.lists(st.integers(-32768, 32767), min_size=8, max_size=8),
              st.integers(-32768, 32767), st.integers(-32768, 32767)),
    st.builds(_absurd_header, st.lists(st.integers(-32768, 32767), min_size=8, max_size=8),
              st.integers(-32768, 32767), st.integers(-32768, 32767)).map(gzip.compress),
)
image_like = st.one_of(
    st.binary(max_size=2000),
    st.binary(max_size=400).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
    st.binary(max_size=400).map(lambda b: b"\xff\xd8\xff\xe0" + b),
    nifti_like,
)
query_values = st.one_of(st.sampled_from(["resnet50", "vit_cnn", "unet3d", "", "true", "false", "1"]), ascii_text)


def good_png() -> bytes:
    grey = np.zeros((96, 96), np.uint8)
    cv2.circle(grey, (48, 48), 36, 180, -1)
    cv2.circle(grey, (40, 52), 10, 250, -1)
    ok, encoded = cv2.imencode(".png", grey)
    assert ok
    return encoded.tobytes()


# -- properties ---------------------------------------------------------------------------------


@FUZZ
@given(parts=st.lists(st.tuples(field_names, file_names, image_like), max_size=3),
       params=st.dictionaries(st.sampled_from(["model", "explain", "x"]), query_values, max_size=3),
       headers=junk_headers)
def test_classification_never_fails_with_5xx(services: Services, parts, params, headers) -> None:
    files = [(field, (name, content, "application/octet-stream")) for field, name, content in parts]
    response = services.gateway.post("/api/v1/classifications", files=files or None, params=params,
                                     headers=headers, data=None if files else {"x": "y"})
    check(response, services)


@FUZZ
@given(parts=st.lists(st.tuples(st.one_of(st.sampled_from(MODALITIES), field_names), file_names, nifti_like),
                      max_size=5),
       model=st.one_of(st.none(), query_values), headers=junk_headers)
def test_segmentation_upload_never_fails_with_5xx(services: Services, parts, model, headers) -> None:
    files = [(field, (name, content, "application/gzip")) for field, name, content in parts]
    response = services.gateway.post("/api/v1/segmentations", files=files or None,
                                     params={"model": model} if model is not None else None,
                                     headers=headers, data=None if files else {"x": "y"})
    check(response, services)


@FUZZ
@given(method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]), job_id=ascii_text,
       name=st.one_of(st.none(), st.sampled_from(["mask.nii.gz", "input_t1.nii.gz", "preview_axial.png"]),
                      ascii_text),
       headers=junk_headers)
def test_job_paths_never_fail_with_5xx(services: Services, method, job_id, name, headers) -> None:
    path = f"/api/v1/segmentations/{quote(job_id, safe='')}"
    if name is not None:
        path += f"/files/{quote(name, safe='')}"
    check(services.gateway.request(method, path, headers=headers), services)


def test_services_stay_up_and_good_requests_still_succeed(services: Services) -> None:
    """Runs after the properties (file order): the real services answered everything and still work."""
    key = {"X-API-Key": API_KEY}
    if SEEN:  # the properties ran first: their requests got past the gateway to the services' own checks
        assert SEEN[401] > 0 and sum(n for code, n in SEEN.items() if code not in (401, 404, 405)) > 30, SEEN
    assert services.classifier.process.poll() is None and services.segmenter.process.poll() is None
    assert services.gateway.get("/api/ready").status_code == 200
    classified = services.gateway.post("/api/v1/classifications", files={"file": ("slice.png", good_png(), "image/png")},
                                       params={"explain": "false"}, headers=key)
    assert classified.status_code == 200, classified.text
    assert set(classified.json()["probabilities"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    upload = {m: (f"case_{m}.nii.gz", data, "application/gzip") for m, data in case_files(seed=5).items()}
    submitted = services.gateway.post("/api/v1/segmentations", files=upload, headers=key)
    assert submitted.status_code == 202, submitted.text
    job_url = submitted.headers["location"]
    assert services.gateway.get(job_url, headers=key).json()["status"] == "queued"
    assert services.gateway.delete(job_url, headers=key).status_code == 200  # cancel: no worker runs here
