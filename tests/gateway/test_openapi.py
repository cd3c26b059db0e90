"""``/openapi.json`` of the gateway and of both services is generated from the response models.

Each app is built as the other tests build it (``create_app(Settings(...))``) and asked for its
``/openapi.json`` over HTTP (the lifespan, which loads models, is not needed for that). Every
route must document a 2xx body that is a component model (a file download: a binary schema), every
error status it lists must answer the shared error model (FastAPI's own 422 model must be gone:
the apps answer 422 with the error body too), and the gateway keeps its examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from brainscan.api_models import BINARY_SCHEMA, ErrorBody, SegmentationJob
from gateway.app import create_app as create_gateway
from gateway.examples import GET_SEGMENTATION_RESPONSES, SEGMENTATION_DONE_EXAMPLE
from gateway.settings import GatewaySettings
from services.classifier.app import create_app as create_classifier
from services.classifier.settings import Settings as ClassifierSettings
from services.segmenter.app import create_app as create_segmenter
from services.segmenter.settings import Settings as SegmenterSettings

ERROR_REF = "#/components/schemas/ErrorBody"
#: routes answering a file, not JSON
BINARY_ROUTES = {("get", "/api/v1/segmentations/{job_id}/files/{name}"), ("get", "/v1/jobs/{job_id}/files/{name}")}


def _spec(app: Any) -> dict[str, Any]:
    response = TestClient(app).get("/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("openapi")
    gateway = create_gateway(GatewaySettings(classifier_url="http://127.0.0.1:9", segmenter_url="http://127.0.0.1:9",
                                             log_level="WARNING"))
    classifier = create_classifier(ClassifierSettings(models_root=root / "models", log_level="WARNING"))
    segmenter = create_segmenter(SegmenterSettings(models_root=root / "models", jobs_dir=root / "jobs",
                                                   log_level="WARNING"))
    return {"gateway": _spec(gateway), "classifier": _spec(classifier), "segmenter": _spec(segmenter)}


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, operation) for path, methods in spec["paths"].items()
            for method, operation in methods.items()]


@pytest.mark.parametrize("service", ["gateway", "classifier", "segmenter"])
def test_every_route_documents_a_model_for_its_success(specs: dict[str, dict[str, Any]], service: str) -> None:
    spec = specs[service]
    components = spec["components"]["schemas"]
    operations = _operations(spec)
    assert len(operations) >= 4
    for method, path, operation in operations:
        success = {status: answer for status, answer in operation["responses"].items() if status.startswith("2")}
        with_body = {status: answer for status, answer in success.items() if status != "204"}
        assert with_body, f"{method} {path} documents no 2xx body"
        for status, answer in with_body.items():
            content = answer.get("content", {})
            if (method, path) in BINARY_ROUTES:
                assert content and all(media["schema"] == BINARY_SCHEMA for media in content.values()), (path, status)
                continue
            ref = content["application/json"]["schema"].get("$ref", "")
            assert ref.startswith("#/components/schemas/"), f"{method} {path} {status}: {content}"
            assert components[ref.rsplit("/", 1)[1]]["properties"], ref


@pytest.mark.parametrize("service", ["gateway", "classifier", "segmenter"])
def test_every_error_answers_the_error_model(specs: dict[str, dict[str, Any]], service: str) -> None:
    spec = specs[service]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    errors = 0
    for method, path, operation in _operations(spec):
        for status, answer in operation["responses"].items():
            if status[0] in "45":
                errors += 1
                ref = answer["content"]["application/json"]["schema"]["$ref"]
                error_model = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
                assert ref == ERROR_REF or set(ErrorBody.model_fields) <= set(error_model["properties"]), \
                    f"{method} {path} {status}: {ref}"
    assert errors >= 3


def test_gateway_keeps_its_examples(specs: dict[str, dict[str, Any]]) -> None:
    for method, path, operation in _operations(specs["gateway"]):
        for status, answer in operation["responses"].items():
            if status == "204" or (method, path) in BINARY_ROUTES and status == "200":
                continue
            media = answer["content"]["application/json"]
            assert "example" in media or "examples" in media, f"{method} {path} {status} lost its example"
    job = specs["gateway"]["paths"]["/api/v1/segmentations/{job_id}"]["get"]["responses"]["200"]
    # FastAPI leaves out the nulls of examples
    assert job["content"]["application/json"]["examples"]["succeeded"]["value"] == {
        key: value for key, value in SEGMENTATION_DONE_EXAMPLE.items() if value is not None}


def test_the_examples_are_valid_bodies() -> None:
    examples = GET_SEGMENTATION_RESPONSES[200]["content"]["application/json"]["examples"]
    for name, example in examples.items():
        job = SegmentationJob.model_validate(example["value"])
        assert job.status == name
    with pytest.raises(ValueError, match="links"):
        SegmentationJob.model_validate({key: value for key, value in SEGMENTATION_DONE_EXAMPLE.items()
                                        if key != "links"})


CASE_FILES = {"t1", "t1ce", "t2", "flair", "t1n", "t1c", "t2w", "t2f", "case", "volume", "dicom"}


@pytest.mark.parametrize("service, path, files", [("gateway", "/api/v1/segmentations", CASE_FILES),
                                                  ("segmenter", "/v1/jobs", CASE_FILES),
                                                  ("gateway", "/api/v1/classifications", {"file"}),
                                                  ("classifier", "/v1/classify", {"file"})])
def test_multipart_uploads_are_documented_from_models(specs: dict[str, dict[str, Any]], service: str, path: str,
                                                      files: set[str]) -> None:
    body = specs[service]["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in body:  # the classifier's File() parameter: FastAPI's own model of the form
        body = specs[service]["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    # a file part: pydantic's bytes ("format": "binary") or FastAPI's UploadFile ("contentMediaType")
    assert {name for name, field in body["properties"].items()
            if field.get("format") == "binary" or "contentMediaType" in field} == files


def test_documented_bodies_are_the_ones_sent(tmp_path: Path) -> None:
    # response_model_exclude_unset: a route that returns a dict sends that dict, no key added
    settings = SegmenterSettings(models_root=tmp_path / "models", jobs_dir=tmp_path / "jobs", log_level="WARNING")
    with TestClient(create_segmenter(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        # an empty store: no model entry, and no optional key of the model filled in
        assert client.get("/v1/models").json() == {"default": settings.default_model, "models": []}
