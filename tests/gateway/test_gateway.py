"""Gateway against the REAL classifier service (a uvicorn subprocess with tiny real bundles).

Covered: pass-through of results and of every 4xx, request ids, the streaming upload limit (also
over a real socket with a chunked body), API keys, CORS, upstream down / slow / ready, OpenAPI,
metrics, security headers, the internal token (the classifier answers only requests that carry it,
the gateway sends it), and that the gateway never imports TensorFlow. The only stand-in is a
deliberately slow upstream (to provoke a timeout), as the real service is never that slow.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.internal_auth import INTERNAL_TOKEN_HEADER, MissingSecretError
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.bundles import make_classifier_store
from tests.servers import (
    INTERNAL_HEADERS,
    INTERNAL_TOKEN,
    REPO_ROOT,
    free_port,
    serve_in_thread,
    serve_uvicorn,
    start_uvicorn,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REQUEST_ID = "gw-test-0001"


# ---------------------------------------------------------------- fixtures and inputs


def _png(grey: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", grey)
    assert ok
    return encoded.tobytes()


def slice_png(size: int = 96) -> bytes:
    """A synthetic head-like slice: a bright ellipse with a darker blob on black."""
    grey = np.zeros((size, size), np.uint8)
    cv2.ellipse(grey, (size // 2, size // 2), (size // 3, size // 2 - 8), 0, 0, 360, 170, -1)
    cv2.circle(grey, (size // 2 + 8, size // 2 - 6), size // 10, 240, -1)
    return _png(grey)


BAD_INPUTS = {
    "empty": b"",
    "text": b"this is a note, not an image\n" * 20,
    "truncated_png": slice_png()[:200],
    "tiny_png": _png(np.full((6, 6), 128, np.uint8)),
}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """The real classifier service on a free port, serving tiny real bundles."""
    store = make_classifier_store(tmp_path_factory.mktemp("models"))
    logs = tmp_path_factory.mktemp("logs")
    env = {"BRAINSCAN_MODELS": str(store), "CLASSIFIER_LOG_LEVEL": "WARNING"}
    with serve_uvicorn("services.classifier.app:app", env=env, ready_path="/readyz", log_dir=logs) as server:
        yield server


def gateway_settings(classifier_url: str, **overrides) -> GatewaySettings:
    base = {"classifier_url": classifier_url, "segmenter_url": "", "log_level": "WARNING",
            "internal_token": INTERNAL_TOKEN}
    return GatewaySettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def gateway(classifier):
    with TestClient(create_app(gateway_settings(classifier.url))) as client:
        yield client


def classify(client, content: bytes, *, query: str = "", request_id: str = REQUEST_ID, **kwargs):
    return client.post(f"/api/v1/classifications{query}", files={"file": ("slice.png", content, "image/png")},
                       headers={"X-Request-ID": request_id, **kwargs.pop("headers", {})}, **kwargs)


# ---------------------------------------------------------------- pass-through


def test_classification_passes_the_service_body_through(gateway, classifier):
    content = slice_png()
    via_gateway = classify(gateway, content)
    direct = httpx.post(f"{classifier.url}/v1/classify", files={"file": ("slice.png", content, "image/png")},
                        headers={"X-Request-ID": REQUEST_ID, **INTERNAL_HEADERS}, timeout=30)
    assert via_gateway.status_code == direct.status_code == 200, via_gateway.text
    got, want = via_gateway.json(), direct.json()
    assert set(got) == set(want)
    assert got["label"] == want["label"]
    assert got["model"] == want["model"]
    assert got["probabilities"].keys() == want["probabilities"].keys()
    for name, p in want["probabilities"].items():
        assert got["probabilities"][name] == pytest.approx(p, abs=1e-5)
    assert got["heatmap"]["overlay_png"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("query", ["?model=vit_cnn", "?model=resnet50&explain=false"])
def test_model_and_explain_are_forwarded(gateway, query):
    response = classify(gateway, slice_png(), query=query)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == query.split("=")[1].split("&")[0]
    assert (body["heatmap"] is None) == ("explain=false" in query)


@pytest.mark.parametrize(("name", "query", "status"), [
    ("empty", "", 400),
    ("text", "", 415),
    ("truncated_png", "", 422),
    ("tiny_png", "", 422),
    (None, "?model=no_such_model", 404),
])
def test_bad_input_passes_through_unchanged(gateway, classifier, name, query, status):
    content = BAD_INPUTS[name] if name else slice_png()
    via_gateway = classify(gateway, content, query=query)
    direct = httpx.post(f"{classifier.url}/v1/classify{query}", files={"file": ("slice.png", content, "image/png")},
                        headers={"X-Request-ID": REQUEST_ID, **INTERNAL_HEADERS}, timeout=30)
    assert via_gateway.status_code == direct.status_code == status
    assert via_gateway.headers["content-type"] == "application/json"
    assert via_gateway.json() == direct.json()  # same request id sent to both, so the bodies are identical
    assert via_gateway.json()["error"]


def test_two_file_fields_are_422_naming_the_field(gateway):
    files = [("file", ("first.png", slice_png(), "image/png")), ("file", ("second.png", slice_png(64), "image/png"))]
    response = gateway.post("/api/v1/classifications", files=files, headers={"X-Request-ID": REQUEST_ID})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "duplicate_field" and body["request_id"] == REQUEST_ID
    assert "['file'] sent more than once" in body["detail"]


def test_models_are_forwarded(gateway, classifier):
    response = gateway.get("/api/v1/models")
    assert response.status_code == 200
    assert response.json() == httpx.get(f"{classifier.url}/v1/models", headers=INTERNAL_HEADERS, timeout=10).json()


@pytest.mark.parametrize(("sent", "expect_same"), [("client-id-42", True), (None, False), ("bad id with spaces", False)])
def test_request_id_is_echoed_forwarded_or_generated(gateway, sent, expect_same):
    headers = {} if sent is None else {"X-Request-ID": sent}
    response = gateway.post("/api/v1/classifications", files={"file": ("s.png", BAD_INPUTS["text"], "image/png")},
                            headers=headers)
    echoed = response.headers["X-Request-ID"]
    assert (echoed == sent) is expect_same
    assert len(echoed) >= 8
    # The body comes from the classifier: the id reached it.
    assert response.json()["request_id"] == echoed


def test_not_multipart_is_415_json(gateway):
    response = gateway.post("/api/v1/classifications", content=slice_png(), headers={"Content-Type": "image/png"})
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"


# ---------------------------------------------------------------- upload limit


def test_declared_length_over_limit_is_413(classifier):
    with TestClient(create_app(gateway_settings(classifier.url, max_upload_bytes=1000))) as client:
        response = classify(client, b"\x89PNG" + bytes(5000))
    assert response.status_code == 413
    body = response.json()
    assert body["error"] == "too_large" and body["request_id"] == REQUEST_ID and "MB" in body["detail"]


def test_limit_is_enforced_while_the_asgi_stream_arrives(classifier):
    """Drive the app directly: the route must stop calling receive() once past the limit."""
    chunk, limit, total_chunks = 4096, 10_000, 1000
    app = create_app(gateway_settings(classifier.url, max_upload_bytes=limit))
    received = {"chunks": 0}
    sent: list[dict] = []

    async def receive() -> dict:
        received["chunks"] += 1
        more = received["chunks"] < total_chunks
        return {"type": "http.request", "body": b"x" * chunk, "more_body": more}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/v1/classifications", "raw_path": b"/api/v1/classifications", "root_path": "",
             "query_string": b"", "server": ("testserver", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"testserver"), (b"content-type", b"multipart/form-data; boundary=x")]}

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 413
    assert received["chunks"] <= limit // chunk + 1
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"] == "too_large"


def test_chunked_upload_over_a_real_socket_is_cut_off(classifier, tmp_path):
    """A body without Content-Length, 64 MiB if sent in full, against a gateway process with a 100 kB limit."""
    env = {"GATEWAY_CLASSIFIER_URL": classifier.url, "GATEWAY_SEGMENTER_URL": "",
           "GATEWAY_MAX_UPLOAD_BYTES": "100000", "GATEWAY_LOG_LEVEL": "WARNING"}
    total_chunks = 1024
    yielded = 0

    def body():
        nonlocal yielded
        for _ in range(total_chunks):
            yielded += 1
            yield b"x" * 65536

    with serve_uvicorn("gateway.app:app", env=env, ready_path="/api/health", log_dir=tmp_path) as server:
        response = httpx.post(f"{server.url}/api/v1/classifications", content=body(), timeout=30,
                              headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    # What was yielded beyond the limit sat in socket buffers; most of the 64 MiB never left.
    assert yielded < total_chunks // 4, f"generator yielded {yielded} of {total_chunks} chunks"


# ---------------------------------------------------------------- API keys and CORS


@pytest.mark.parametrize(("method", "path", "key", "status"), [
    ("GET", "/api/v1/models", None, 401),
    ("GET", "/api/v1/models", "wrong", 401),
    ("GET", "/api/v1/models", "key-two", 200),
    ("POST", "/api/v1/classifications", None, 401),
    ("POST", "/api/v1/classifications", "key-one", 200),
    ("GET", "/api/health", None, 200),
    ("GET", "/api/ready", None, 200),
    ("GET", "/", None, 200),
    ("GET", "/app.js", None, 200),
    ("GET", "/docs", None, 200),
])
def test_api_keys_guard_v1_only(classifier, method, path, key, status):
    settings = gateway_settings(classifier.url, api_keys="key-one, key-two")
    headers = {} if key is None else {"X-API-Key": key}
    files = {"file": ("s.png", slice_png(), "image/png")} if method == "POST" else None
    with TestClient(create_app(settings)) as client:
        response = client.request(method, path, headers=headers, files=files)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json()["error"] == "unauthorized"
        assert "X-API-Key" in response.json()["detail"]


@pytest.mark.parametrize(("origins", "origin", "allowed"), [
    ("https://lab.example", "https://lab.example", True),
    ("https://lab.example", "https://evil.example", False),
    ("", "https://lab.example", False),
])
def test_cors_allow_list(classifier, origins, origin, allowed):
    with TestClient(create_app(gateway_settings(classifier.url, cors_origins=origins))) as client:
        simple = client.get("/api/health", headers={"Origin": origin})
        preflight = client.options("/api/v1/classifications", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key"})
    assert (simple.headers.get("access-control-allow-origin") == origin) is allowed
    assert ("access-control-allow-origin" in preflight.headers) is allowed
    if allowed:
        assert preflight.status_code == 200


# ---------------------------------------------------------------- the internal token


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/models"), ("POST", "/v1/classify"), ("GET", "/metrics"), ("GET", "/openapi.json"),
    ("GET", "/docs"), ("GET", "/no-such-path"),
])
@pytest.mark.parametrize("token", [None, "", "a-wrong-token-of-decent-length", INTERNAL_TOKEN[:-1]],
                         ids=["none", "empty", "wrong", "one-char-short"])  # the token is random: not in the id
def test_classifier_answers_401_without_the_internal_token(classifier, method, path, token):
    headers = {} if token is None else {INTERNAL_TOKEN_HEADER: token}
    files = {"file": ("slice.png", slice_png(), "image/png")} if method == "POST" else None
    response = httpx.request(method, classifier.url + path, headers=headers, files=files, timeout=30)
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == "unauthorized" and body["request_id"] and INTERNAL_TOKEN_HEADER in body["detail"]
    assert INTERNAL_TOKEN not in response.text


def test_classifier_probes_stay_open_and_prometheus_may_use_a_bearer_token(classifier):
    for path in ("/healthz", "/readyz"):
        response = httpx.get(classifier.url + path, timeout=10)
        assert response.status_code == 200, path
        assert INTERNAL_TOKEN not in response.text
    assert httpx.get(f"{classifier.url}/v1/models", timeout=10).status_code == 401
    scrape = httpx.get(f"{classifier.url}/metrics", headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"}, timeout=10)
    assert scrape.status_code == 200 and "classifier_requests_total" in scrape.text
    # refused attempts are counted like any request, under no route
    assert 'classifier_requests_total{method="GET",route="unmatched",status="401"}' in scrape.text


def test_a_gateway_with_the_wrong_token_says_so_to_the_operator(classifier):
    settings = gateway_settings(classifier.url, internal_token="not-this-deployments-token")
    with TestClient(create_app(settings)) as client:
        response = classify(client, slice_png())
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "bad_gateway" and "BRAINSCAN_INTERNAL_TOKEN" in body["detail"]
    assert "not-this-deployments-token" not in response.text


@pytest.mark.parametrize(("token", "message"), [(None, "BRAINSCAN_INTERNAL_TOKEN is not set"),
                                                ("", "BRAINSCAN_INTERNAL_TOKEN is not set"),
                                                ("short", "BRAINSCAN_INTERNAL_TOKEN is too short")])
def test_gateway_needs_the_token_outside_development_mode(token, message):
    with pytest.raises(MissingSecretError, match=message) as refused:
        create_app(gateway_settings("http://127.0.0.1:9", internal_token=token, environment="production"))
    assert "BRAINSCAN_ENV=development" in str(refused.value) or "too short" in message
    # development mode: it starts, and sends no token
    create_app(gateway_settings("http://127.0.0.1:9", internal_token=token, environment="development"))


def test_classifier_without_a_token_does_not_start_outside_development_mode(tmp_path):
    env = {"BRAINSCAN_ENV": "production", "BRAINSCAN_INTERNAL_TOKEN": "", "BRAINSCAN_MODELS": str(tmp_path)}
    with pytest.raises(RuntimeError) as refused:
        start_uvicorn("services.classifier.app:app", env=env, ready_timeout_s=60, log_dir=tmp_path).stop()
    assert "BRAINSCAN_INTERNAL_TOKEN is not set" in str(refused.value)
    assert "BRAINSCAN_ENV=development" in str(refused.value)


# ---------------------------------------------------------------- upstream failures and readiness


def test_classifier_down_is_503_quickly():
    with TestClient(create_app(gateway_settings(f"http://127.0.0.1:{free_port()}"))) as client:
        started = time.monotonic()
        response = classify(client, slice_png())
        elapsed = time.monotonic() - started
        models = client.get("/api/v1/models")
        ready = client.get("/api/ready")
        metrics = client.get("/metrics").text
    assert response.status_code == models.status_code == 503
    assert response.json()["error"] == "service_unavailable" and response.json()["request_id"] == REQUEST_ID
    assert "try again" in response.json()["detail"].lower()
    assert elapsed < 3.0
    assert ready.status_code == 503
    assert ready.json()["services"]["classifier"]["status"] == "unreachable"
    assert 'gateway_upstream_errors_total{kind="service_unavailable",service="classifier"} 2.0' in metrics


def test_ready_when_classifier_is_up(gateway):
    response = gateway.get("/api/ready")
    assert response.status_code == 200, response.text
    services = response.json()["services"]
    assert services["classifier"]["status"] == "ready"
    assert services["segmenter"]["status"] == "not configured"


async def _slow_upstream(scope, receive, send):
    """Answers every request but ``/`` after 2 s: only to make the gateway's timeouts fire."""
    if scope["type"] != "http":
        return
    if scope["path"] != "/":
        await asyncio.sleep(2)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


def test_slow_upstream_is_504_and_not_ready():
    with serve_in_thread(_slow_upstream) as slow_url:
        settings = gateway_settings(slow_url, timeout_s=0.4, ready_timeout_s=0.3)
        with TestClient(create_app(settings)) as client:
            started = time.monotonic()
            response = classify(client, slice_png())
            elapsed = time.monotonic() - started
            ready = client.get("/api/ready")
    assert response.status_code == 504
    assert response.json()["error"] == "upstream_timeout"
    assert elapsed < 1.8
    assert ready.status_code == 503
    assert ready.json()["services"]["classifier"]["status"] == "unreachable"


# ---------------------------------------------------------------- docs, metrics, headers, imports


def test_openapi_documents_examples(gateway):
    assert gateway.get("/docs").status_code == 200
    schema = gateway.get("/openapi.json").json()
    operation = schema["paths"]["/api/v1/classifications"]["post"]
    assert "multipart/form-data" in operation["requestBody"]["content"]
    for status in ("200", "413", "415", "503", "504"):
        assert "example" in operation["responses"][status]["content"]["application/json"], status
    assert {"/api/health", "/api/ready", "/api/v1/models"} <= set(schema["paths"])


def test_metrics_count_requests_by_route_and_status(gateway):
    classify(gateway, BAD_INPUTS["text"])
    text = gateway.get("/metrics").text
    assert 'route="/api/v1/classifications",status="415"' in text
    assert "gateway_request_duration_seconds_bucket" in text


def test_frontend_and_security_headers(gateway):
    response = gateway.get("/")
    assert response.status_code == 200
    assert "not for clinical use" in response.text.lower()
    assert response.headers["x-content-type-options"] == "nosniff"
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "img-src 'self' data:" in policy
    assert "unsafe-inline" not in policy
    assert gateway.get("/api/nothing-here").json()["error"] == "not_found"


def test_gateway_does_not_import_tensorflow():
    code = ("import sys, gateway.app; gateway.app.create_app(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT),
                                             "GATEWAY_SEGMENTER_URL": "", "BRAINSCAN_INTERNAL_TOKEN": INTERNAL_TOKEN})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="max_upload_bytes"):
        GatewaySettings(max_upload_bytes=0)
    with pytest.raises(ValueError, match="http"):
        GatewaySettings(classifier_url="ftp://x")
    assert GatewaySettings(api_keys=" a, ,b ", cors_origins="https://x.example").cors_origins == ["https://x.example"]
    assert [k.get_secret_value() for k in GatewaySettings(api_keys=" a, ,b ").api_keys] == ["a", "b"]


def test_frontend_dir_setting_points_at_the_page():
    assert (Path(GatewaySettings().frontend_dir) / "index.html").is_file()
