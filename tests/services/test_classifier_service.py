"""Classifier service: the contract of docs/CONTRACTS.md on real tiny bundles (both architectures),
bad inputs with their own statuses, micro-batching under concurrency, parity with the bundle's own
preprocessing and network, readiness without / with broken models, and a real uvicorn process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from brainscan.models.bundle import load_bundle, read_manifest
from brainscan.models.store import ModelStore
from services.classifier.app import create_app
from services.classifier.batching import MicroBatcher, bucket_sizes, pad_to_bucket
from services.classifier.settings import Settings
from tests.bundles import TINY_INPUT_SIZE, make_classifier_store
from tests.paths import KAGGLE_TRAINING, REPO_ROOT, needs_kaggle

ARCHS = ("resnet50", "vit_cnn")
METHODS = {"resnet50": "grad-cam-stage2", "vit_cnn": "gradient-attention-rollout"}
CONTRACT_KEYS = {"label", "probabilities", "model", "heatmap", "image", "timings", "request_id"}
TIMING_KEYS = {"decode_ms", "queue_ms", "inference_ms", "explain_ms", "total_ms"}


# -- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier_store(tmp_path_factory.mktemp("models"))


def settings_for(root: Path, **overrides: object) -> Settings:
    values = {"models_root": root, "default_model": "resnet50", "expected_models": "resnet50,vit_cnn",
              "max_upload_bytes": 1_000_000, "batch_window_ms": 20.0, "max_batch": 16, "warmup": True}
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(store))) as test_client:
        yield test_client


def slice_image(size: int = 160, seed: int = 0) -> np.ndarray:
    """A synthetic axial slice: dark border, grey head, a bright lesion placed by ``seed``."""
    rng = np.random.default_rng(seed)
    grey = np.zeros((size, size), np.uint8)
    cv2.ellipse(grey, (size // 2, size // 2), (size // 3, int(size / 2.5)), 0, 0, 360, 110, -1)
    lesion = (int(rng.integers(size // 3, 2 * size // 3)), int(rng.integers(size // 3, 2 * size // 3)))
    cv2.circle(grey, lesion, size // 12, 230, -1)
    return np.clip(grey + rng.normal(0, 6, grey.shape), 0, 255).astype(np.uint8)


def encode(grey: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, data = cv2.imencode(ext, grey)
    assert ok
    return data.tobytes()


JPEG = encode(slice_image())


def classify(client: TestClient, raw: bytes, name: str = "slice.jpg", **params: object) -> httpx.Response:
    return client.post("/v1/classify", params=params, files={"file": (name, raw, "image/jpeg")})


def decode_png(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = cv2.imdecode(np.frombuffer(base64.b64decode(url[len(prefix):]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return image


def batch_size_samples(metrics_text: str, model: str) -> dict[str, float]:
    """``{"count", "sum", "le=1"}`` of the batch-size histogram of ``model``."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "classifier_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_count"):
                found["count"] = sample.value
            elif sample.name.endswith("_sum"):
                found["sum"] = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 1.0:
                found["le=1"] = sample.value
    return found


# -- the contract -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_classify_returns_the_contract(client: TestClient, store: Path, arch: str) -> None:
    response = classify(client, JPEG, model=arch)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == CONTRACT_KEYS
    manifest = read_manifest(ModelStore(store).current("classification", arch))
    assert list(body["probabilities"]) == manifest["classes"]
    probabilities = np.array(list(body["probabilities"].values()))
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5) and probabilities.min() >= 0
    assert body["label"] == manifest["classes"][int(probabilities.argmax())]
    assert body["model"] == {"name": arch, "arch": arch, "version": manifest["version"], "demo": manifest["demo"],
                             "tta": manifest["inference"].get("tta", []),
                             "temperature": manifest["inference"].get("temperature", 1.0)}
    assert body["image"] == {"width": 160, "height": 160, "format": "jpeg"}
    assert set(body["timings"]) == TIMING_KEYS and all(v >= 0 for v in body["timings"].values())
    assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"]
    assert body["heatmap"]["method"] == METHODS[arch]
    view, overlay = decode_png(body["heatmap"]["image_png"]), decode_png(body["heatmap"]["overlay_png"])
    assert view.shape == (TINY_INPUT_SIZE, TINY_INPUT_SIZE)
    assert overlay.shape == (TINY_INPUT_SIZE, TINY_INPUT_SIZE, 4)
    assert overlay[:, :, 3].max() > 0, "some region must be highlighted"
    assert body["request_id"] == response.headers["X-Request-ID"]


def test_explain_false_skips_the_heatmap(client: TestClient) -> None:
    body = classify(client, JPEG, explain="false").json()
    assert body["heatmap"] is None and body["timings"]["explain_ms"] == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_the_bundle(client: TestClient, store: Path, arch: str) -> None:
    """Same bytes through the service and through bundle.preprocess + bundle.model directly."""
    bundle = load_bundle(ModelStore(store).current("classification", arch))
    raw = encode(slice_image(seed=7), ".png")
    expected = np.asarray(bundle.model(bundle.preprocess(raw)[None], training=False))[0]
    served = classify(client, raw, "slice.png", model=arch, explain="false").json()["probabilities"]
    np.testing.assert_allclose(list(served.values()), expected, atol=1e-5)


def test_unknown_model_is_404(client: TestClient) -> None:
    response = classify(client, JPEG, model="alexnet")
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_model" and "resnet50" in response.json()["detail"]


def test_models_lists_the_manifests(client: TestClient, store: Path) -> None:
    body = client.get("/v1/models").json()
    assert body["default"] == "resnet50"
    assert [entry["name"] for entry in body["models"]] == list(ARCHS)
    for entry in body["models"]:
        manifest = read_manifest(ModelStore(store).current("classification", entry["name"]))
        assert entry["manifest"] == manifest
        assert entry["metrics"] == manifest["metrics"] and entry["created_at"] == manifest["created_at"]
        assert (entry["version"], entry["demo"], entry["classes"]) == (manifest["version"], manifest["demo"],
                                                                       manifest["classes"])
        assert entry["input_size"] == manifest["preprocessing"]["params"]["input_size"]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == {"resnet50": "test-1", "vit_cnn": "test-1"} and ready.json()["missing"] == {}


@pytest.mark.parametrize(
    "given, echoed",
    [("trace-42.a:b", True), ("has spaces in it", False), ("x" * 200, False)],
)
def test_request_id_is_taken_or_generated(client: TestClient, given: str, echoed: bool) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": given})
    returned = response.headers["X-Request-ID"]
    if echoed:
        assert returned == given
    else:
        assert returned != given and len(returned) == 32 and int(returned, 16) >= 0


# -- bad input ------------------------------------------------------------------------------------

BAD_INPUTS = [
    # name, file tuple (None: no file field), status, error code
    ("zero bytes", ("empty.jpg", b""), 400, "empty_input"),
    ("text named .jpg", ("notes.jpg", b"patient notes, not an image\n" * 20), 415, "unsupported_format"),
    ("truncated JPEG", ("cut.jpg", JPEG[: len(JPEG) // 2]), 422, "corrupt_file"),
    ("1x20000 image", ("line.png", encode(np.full((1, 20000), 128, np.uint8), ".png")), 422, "bad_dimensions"),
    ("missing file field", None, 422, "invalid_request"),
]


@pytest.mark.parametrize("name, upload, status, code", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_its_own_status(client: TestClient, name: str, upload: tuple | None, status: int,
                                       code: str) -> None:
    if upload is None:
        response = client.post("/v1/classify", data={"image": "x"})
    else:
        response = client.post("/v1/classify", files={"file": (*upload, "image/jpeg")})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["detail"] and body["request_id"] == response.headers["X-Request-ID"]
    if upload is None:
        assert "'file'" in body["detail"]
    # the service is unharmed
    assert classify(client, JPEG, explain="false").status_code == 200


def test_two_file_fields_are_422_naming_the_field(client: TestClient) -> None:
    other = encode(slice_image(seed=3))
    response = client.post("/v1/classify", files=[("file", ("first.jpg", JPEG, "image/jpeg")),
                                                  ("file", ("second.jpg", other, "image/jpeg"))])
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "duplicate_field"
    assert "field(s) ['file'] sent more than once; send one image in the field 'file'" == body["detail"]


@pytest.fixture(scope="module")
def strict_client(store: Path) -> Iterator[TestClient]:
    """Small upload, pixel and decoding limits, vit_cnn as the default model."""
    settings = settings_for(store, default_model="vit_cnn", max_upload_bytes=4096, max_pixels=100_000,
                            max_decoded_bytes=150_000, warmup=False)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_default_model_comes_from_settings(strict_client: TestClient) -> None:
    small = encode(slice_image(size=64), ".png")
    assert len(small) < 4096
    response = classify(strict_client, small, "small.png")
    assert response.status_code == 200, response.text
    assert response.json()["model"]["name"] == "vit_cnn"
    assert strict_client.get("/v1/models").json()["default"] == "vit_cnn"


@pytest.mark.parametrize(
    "size, what",
    [(6000, "capped while reading the file"), (200_000, "refused by Content-Length before reading")],
)
def test_too_large_upload_is_413(strict_client: TestClient, size: int, what: str) -> None:
    raw = JPEG[:3] + np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    response = classify(strict_client, raw)
    assert response.status_code == 413, what
    assert response.json()["error"] == "too_large" and "4096" in response.json()["detail"]


def test_too_many_pixels_is_413(strict_client: TestClient) -> None:
    flat = encode(np.full((400, 400), 90, np.uint8), ".png")  # 160 000 px, a few hundred bytes
    response = classify(strict_client, flat, "big.png")
    assert response.status_code == 413 and "100000" in response.json()["detail"]


def test_over_the_decoding_budget_is_413_saying_why(strict_client: TestClient) -> None:
    colour = encode(np.full((300, 300, 3), 90, np.uint8), ".png")  # 90 000 px, under the pixel cap
    response = classify(strict_client, colour, "colour.png")
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "300x300 PNG with 3 bytes per pixel: 0.27 MB once decoded" in detail
    assert "decoding limit of 0.15 MB" in detail and "8-bit greyscale" in detail
    grey = encode(np.full((300, 300), 90, np.uint8), ".png")  # the same image in grey passes
    assert classify(strict_client, grey, "grey.png").status_code == 200


def test_image_tasks_are_counted_and_end(client: TestClient) -> None:
    assert classify(client, JPEG).status_code == 200
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(client.get("/metrics").text)
               for sample in family.samples if sample.name.startswith("classifier_image_tasks")}
    assert samples[("classifier_image_tasks", (("state", "queued"),))] == 0
    assert samples[("classifier_image_tasks", (("state", "running"),))] == 0
    assert samples[("classifier_image_tasks_dropped_total", ())] == 0


# -- micro-batching -------------------------------------------------------------------------------

def test_concurrent_requests_are_batched(client: TestClient) -> None:
    images = [encode(slice_image(seed=seed)) for seed in range(4)]
    solo = [classify(client, raw, explain="false").json()["probabilities"] for raw in images]
    barrier = Barrier(16)

    def post(index: int) -> httpx.Response:
        barrier.wait()
        return classify(client, images[index % 4], explain="false")

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    for index, response in enumerate(responses):
        # every request gets its own row of the batch, whatever the batch and its padding
        np.testing.assert_allclose(list(response.json()["probabilities"].values()),
                                   list(solo[index % 4].values()), atol=1e-5)
    histogram = batch_size_samples(client.get("/metrics").text, "resnet50")
    assert histogram["count"] - histogram["le=1"] >= 1, f"no batch held more than one request: {histogram}"
    assert histogram["sum"] > histogram["count"]
    requests_total = client.get("/metrics").text
    assert 'classifier_requests_total{method="POST",route="/v1/classify",status="200"}' in requests_total


@pytest.mark.parametrize(
    "max_batch, expected",
    [(1, (1,)), (4, (1, 2, 4)), (12, (1, 2, 4, 8, 12)), (16, (1, 2, 4, 8, 16)), (40, (1, 2, 4, 8, 16, 40))],
)
def test_bucket_sizes(max_batch: int, expected: tuple[int, ...]) -> None:
    assert bucket_sizes(max_batch) == expected


@pytest.mark.parametrize("count, padded", [(1, 1), (3, 4), (5, 8), (8, 8)])
def test_pad_to_bucket(count: int, padded: int) -> None:
    batch = np.ones((count, 2, 2, 1), np.float32)
    out = pad_to_bucket(batch, bucket_sizes(8))
    assert out.shape[0] == padded and out[:count].sum() == batch.sum() and out[count:].sum() == 0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bucket_sizes_rejects_bad_max_batch(bad: object) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        bucket_sizes(bad)  # type: ignore[arg-type]


def test_batcher_gives_each_request_its_row_and_survives_errors() -> None:
    shapes: list[int] = []
    fail = {"now": False}

    def forward(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape[0])
        if fail["now"]:
            raise RuntimeError("forward pass failed")
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)

    async def scenario() -> tuple[list, list]:
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(forward, name="fake", executor=executor, max_batch=8, window_ms=20)
            batcher.start()
            results = await asyncio.gather(*(batcher.submit(np.full((2, 2, 1), i, np.float32)) for i in range(11)))
            fail["now"] = True
            errors = await asyncio.gather(batcher.submit(np.zeros((2, 2, 1))), return_exceptions=True)
            fail["now"] = False
            after = await batcher.submit(np.full((2, 2, 1), 5.0))
            await batcher.close()
        return results, [*errors, after]

    results, (error, after) = asyncio.run(scenario())
    assert [float(r.output[0]) for r in results] == [4.0 * i for i in range(11)]
    assert max(r.batch_size for r in results) > 1
    assert set(shapes) <= set(bucket_sizes(8)), "only bucket sizes reach the network"
    assert isinstance(error, RuntimeError) and float(after.output[0]) == 20.0


# -- readiness without models -------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["no such folder", "empty folder"])
def test_no_models_means_503(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "models"
    if layout == "empty folder":
        (root / "classification").mkdir(parents=True)
    with TestClient(create_app(settings_for(root))) as empty:
        ready = empty.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"] == "not_ready" and set(ready.json()["missing"]) == set(ARCHS)
        response = classify(empty, JPEG)
        assert response.status_code == 503 and response.json()["error"] == "model_unavailable"
        assert empty.get("/healthz").status_code == 200
        assert empty.get("/v1/models").json()["models"] == []


@pytest.mark.parametrize("damage, section", [("corrupt weights", "failed"), ("deleted", "missing")])
def test_broken_model_is_skipped(store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str,
                                 section: str) -> None:
    root = Path(shutil.copytree(store, tmp_path / "models"))
    vit_dir = ModelStore(root).current("classification", "vit_cnn")
    if damage == "corrupt weights":
        weights = vit_dir / "weights.npz"
        weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))
    else:
        shutil.rmtree(vit_dir.parent)
    with caplog.at_level("WARNING", logger="services.classifier"):
        with TestClient(create_app(settings_for(root, warmup=False))) as partial:
            ready = partial.get("/readyz")
            assert ready.status_code == 200 and list(ready.json()["models"]) == ["resnet50"]
            assert "vit_cnn" in ready.json()[section]
            response = classify(partial, JPEG, model="vit_cnn")
            assert response.status_code == 503 and response.json()["error"] == "model_unavailable"
            assert classify(partial, JPEG, model="resnet50", explain="false").status_code == 200
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "vit_cnn" in logged and (("corrupt" in logged) if damage == "corrupt weights" else "missing" in logged)


# -- settings -----------------------------------------------------------------------------------

def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in {"BRAINSCAN_MODELS": str(tmp_path), "CLASSIFIER_DEFAULT_MODEL": "vit_cnn",
                       "CLASSIFIER_MAX_UPLOAD_BYTES": "1234", "CLASSIFIER_BATCH_WINDOW_MS": "2.5",
                       "CLASSIFIER_MAX_BATCH": "8", "CLASSIFIER_MAX_PIXELS": "99999",
                       "CLASSIFIER_MAX_DECODED_BYTES": "777777", "CLASSIFIER_IMAGE_WORKERS": "3"}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.store_root(), settings.default_model, settings.max_upload_bytes, settings.batch_window_ms,
            settings.max_batch, settings.max_pixels, settings.max_decoded_bytes, settings.image_workers) == (
        tmp_path, "vit_cnn", 1234, 2.5, 8, 99999, 777777, 3)


@pytest.mark.parametrize(
    "variable, value",
    [("CLASSIFIER_MAX_BATCH", "0"), ("CLASSIFIER_MAX_UPLOAD_BYTES", "-5"), ("CLASSIFIER_BATCH_WINDOW_MS", "x"),
     ("CLASSIFIER_LOG_LEVEL", "LOUD"), ("CLASSIFIER_IMAGE_WORKERS", "0"), ("CLASSIFIER_MAX_DECODED_BYTES", "-1")],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=variable.removeprefix("CLASSIFIER_").lower()):
        Settings()


# -- real data and a real server ----------------------------------------------------------------

def first_kaggle_jpeg() -> Path:
    return sorted((KAGGLE_TRAINING / "glioma").glob("*.jpg"))[0]


@needs_kaggle
def test_real_kaggle_jpeg(client: TestClient) -> None:
    path = first_kaggle_jpeg()
    height, width = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape
    response = classify(client, path.read_bytes(), path.name, model="vit_cnn")
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": width, "height": height, "format": "jpeg"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_real_uvicorn_process(store: Path, tmp_path: Path) -> None:
    path = first_kaggle_jpeg() if KAGGLE_TRAINING.is_dir() else tmp_path / "slice.jpg"
    if not path.exists():
        path.write_bytes(JPEG)
    port = free_port()
    log_path = tmp_path / "service.log"
    env = {**os.environ, "BRAINSCAN_MODELS": str(store), "PYTHONPATH": str(REPO_ROOT),
           "CLASSIFIER_DEFAULT_MODEL": "resnet50", "CLASSIFIER_LOG_LEVEL": "INFO"}
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "services.classifier.app:app", "--host", "127.0.0.1",
             "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, log_path.read_text()[-3000:]
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the service did not become ready in 120 s"
                time.sleep(0.5)
            response = httpx.post(f"{base}/v1/classify", headers={"X-Request-ID": "uvicorn-test-1"},
                                  files={"file": (path.name, path.read_bytes(), "image/jpeg")}, timeout=60)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == "uvicorn-test-1" == response.headers["X-Request-ID"]
    assert body["model"]["name"] == "resnet50" and body["heatmap"]["method"] == METHODS["resnet50"]
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "uvicorn-test-1" and line.get("status") == 200 for line in lines)


# -- dependency overrides -------------------------------------------------------------------------

def test_unexpected_failure_is_a_logged_json_500(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    from services.classifier.app import get_predictor

    class BrokenPredictor:
        def resolve(self, name: str | None) -> None:
            raise RuntimeError("simulated bug")

    client.app.dependency_overrides[get_predictor] = BrokenPredictor
    try:
        with caplog.at_level("ERROR", logger="services.classifier"):
            response = classify(client, JPEG)
    finally:
        client.app.dependency_overrides.clear()
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal_error" and body["request_id"] == response.headers["X-Request-ID"]
    assert any("simulated bug" in (record.exc_text or "") or record.exc_info for record in caplog.records)
    assert classify(client, JPEG, explain="false").status_code == 200


def test_service_serves_the_bundles_tta_and_temperature_as_evaluate_and_predict_do(tmp_path: Path) -> None:
    """One prediction path: the service, `evaluate` and `predict` (classify_images) give the same numbers."""
    from brainscan.inference.classifier import classify_images
    from brainscan.models.bundle import load_bundle

    calibrated = make_classifier_store(tmp_path / "calibrated", archs=("resnet50",),
                                       inference={"tta": ["flip_lr"], "temperature": 2.5})
    plain = make_classifier_store(tmp_path / "plain", archs=("resnet50",))
    image = encode(slice_image(seed=5))
    served = {}
    for name, root in (("calibrated", calibrated), ("plain", plain)):
        with TestClient(create_app(settings_for(root))) as test_client:
            response = classify(test_client, image, model="resnet50", explain="false")
        assert response.status_code == 200, response.text
        served[name] = response.json()
        bundle = load_bundle(ModelStore(root).current("classification", "resnet50"))
        offline = classify_images(bundle, [image])[0]
        np.testing.assert_allclose(list(served[name]["probabilities"].values()), offline, atol=1e-5)
    assert served["calibrated"]["model"]["tta"] == ["flip_lr"] and served["calibrated"]["model"]["temperature"] == 2.5
    assert served["plain"]["model"]["tta"] == [] and served["plain"]["model"]["temperature"] == 1.0
    # Same weights (same seed), so the difference is the TTA and the temperature: softer, same ranking
    # unless the flip changed it.
    calibrated_p = np.array(list(served["calibrated"]["probabilities"].values()))
    plain_p = np.array(list(served["plain"]["probabilities"].values()))
    assert not np.allclose(calibrated_p, plain_p, atol=1e-4)
    assert calibrated_p.max() - calibrated_p.min() < plain_p.max() - plain_p.min() + 1e-6 or \
        calibrated_p.argmax() != plain_p.argmax()
