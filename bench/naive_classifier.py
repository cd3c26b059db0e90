"""The naive serving pattern, for comparison only: one ``model.predict`` call per request.

Same route and body as the real classifier service (``POST /v1/classify``, multipart ``file``), so
the gateway can sit in front of either and the benchmark compares like with like. It uses the same
bundle and the same preprocessing; what it lacks is micro-batching and a compiled forward pass.

Run: ``BRAINSCAN_MODELS=models BENCH_ARCH=resnet50 uvicorn bench.naive_classifier:app --port 8199``
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI, File, UploadFile

from brainscan.models.bundle import load_bundle
from brainscan.models.store import ModelStore

app = FastAPI(title="naive classifier (benchmark baseline)")
_bundle = load_bundle(ModelStore(os.environ.get("BRAINSCAN_MODELS")).current(
    "classification", os.environ.get("BENCH_ARCH", "resnet50")))


@app.get("/readyz")
def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/v1/classify")
def classify(file: UploadFile = File(...)) -> dict[str, object]:
    image = _bundle.preprocess(file.file.read())
    probabilities = _bundle.model.predict(image[None], verbose=0)[0]
    return {"label": _bundle.classes[int(np.argmax(probabilities))],
            "probabilities": dict(zip(_bundle.classes, map(float, probabilities)))}
