"""Tests of brainscan.models.manifest: the typed manifest reads every shipped bundle and writes it
back byte for byte, keeps keys it does not know, gives old bundles the current preprocessing
algorithm version, and refuses bad manifests with the errors read_manifest always gave."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from brainscan.errors import BundleError
from brainscan.models.bundle import preprocessor_from_manifest, read_manifest, read_spec
from brainscan.models.manifest import (
    PREPROCESSING_ALGORITHM_VERSION,
    InferenceSpec,
    Manifest,
    PreprocessingSpec,
    validate_manifest,
)
from tests.paths import REPO_ROOT

SHIPPED = sorted((REPO_ROOT / "models").glob("*/*/*/manifest.json"))
REGION_UNET = REPO_ROOT / "models" / "segmentation" / "unet3d" / "2" / "manifest.json"
CLASSIFIER = REPO_ROOT / "models" / "classification" / "resnet50" / "1.1" / "manifest.json"


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_repository_ships_manifests_of_both_tasks():
    tasks = {_load(path)["task"] for path in SHIPPED}
    assert tasks == {"classification", "segmentation"}, SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO_ROOT / "models").parent) for p in SHIPPED])
def test_every_shipped_manifest_round_trips_byte_for_byte(path):
    text = path.read_text(encoding="utf-8")
    manifest = json.loads(text)
    spec = Manifest.from_dict(manifest, source=path)
    assert spec.to_dict() == manifest
    assert json.dumps(spec.to_dict(), indent=2) + "\n" == text  # what save_bundle writes
    assert read_manifest(path.parent) == manifest
    assert read_spec(path) == spec


def test_typed_fields_of_a_region_segmenter():
    spec = read_spec(REGION_UNET)
    assert (spec.task, spec.architecture.name, spec.version) == ("segmentation", "unet3d", "2")
    assert spec.label_map == {0: 0, 1: 1, 2: 2, 3: 4} and spec.label_names[3] == "ET"
    assert spec.input.modalities == ("t1", "t1ce", "t2", "flair") and spec.input.shape == (None, None, None, 4)
    assert spec.inference.patch_size == (48, 48, 48) and spec.inference.mirror_axes == (0,)
    assert spec.inference.outputs == "regions" and spec.num_outputs == 3
    assert spec.inference.postprocessing == {"threshold": 0.5, "min_component_mm3": 0.0, "min_enhancing_mm3": 0.0}
    assert spec.preprocessing.kind == "volume3d" and spec.preprocessing.params["target_spacing"] == 2.0
    assert spec.classes is None and spec.weights.dtype == "float16"


def test_typed_fields_of_a_calibrated_classifier():
    spec = read_spec(CLASSIFIER)
    assert spec.classes == ("glioma", "meningioma", "notumor", "pituitary") and spec.num_outputs == 4
    assert spec.inference.tta == ("flip_lr",) and spec.inference.temperature == pytest.approx(1.06187)
    assert spec.inference.batch_size == 32 and spec.inference.patch_size is None
    assert spec.label_map is None


def test_the_manifest_is_frozen():
    spec = read_spec(CLASSIFIER)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.inference.temperature = 2.0  # type: ignore[misc]
    returned = spec.to_dict()
    returned["inference"]["tta"].append("flip_ud")
    assert spec.inference.tta == ("flip_lr",) and spec.to_dict()["inference"]["tta"] == ["flip_lr"]


def test_an_old_manifest_without_algorithm_version_reads_as_the_current_version():
    manifest = _load(REGION_UNET)
    assert "algorithm_version" not in manifest["preprocessing"]  # written before the field existed
    spec = Manifest.from_dict(manifest)
    assert spec.preprocessing.algorithm_version == PREPROCESSING_ALGORITHM_VERSION["volume3d"]
    assert not spec.preprocessing.version_recorded
    assert "algorithm_version" not in spec.to_dict()["preprocessing"]
    config, _ = preprocessor_from_manifest(spec)
    assert config.target_spacing == 2.0


def test_a_recorded_algorithm_version_round_trips_and_an_unknown_one_is_refused_at_load():
    manifest = _load(CLASSIFIER)
    manifest["preprocessing"]["algorithm_version"] = 1
    spec = Manifest.from_dict(manifest)
    assert spec.preprocessing.version_recorded and spec.to_dict() == manifest
    manifest["preprocessing"]["algorithm_version"] = 99
    newer = Manifest.from_dict(manifest)  # readable (listing works) ...
    assert newer.preprocessing.algorithm_version == 99
    with pytest.raises(BundleError, match="algorithm_version 99"):  # ... but never fed wrongly
        preprocessor_from_manifest(newer)
    assert PreprocessingSpec("image2d", {}).to_dict() == {"kind": "image2d", "params": {}, "algorithm_version": 1}


def test_unknown_keys_survive_the_round_trip_at_every_level():
    manifest = _load(REGION_UNET)
    manifest["license"] = {"name": "CC-BY-4.0"}
    manifest["architecture"]["framework"] = "keras3"
    manifest["input"]["range"] = [0, 1]
    manifest["preprocessing"]["bias_correction"] = "n4"
    manifest["inference"]["ensemble"] = ["fold0", "fold1"]
    manifest["weights"]["compression"] = "zip"
    spec = Manifest.from_dict(copy.deepcopy(manifest))
    assert spec.extra == {"license": {"name": "CC-BY-4.0"}}
    assert spec.inference.extra == {"ensemble": ["fold0", "fold1"]}
    assert spec.preprocessing.extra == {"bias_correction": "n4"}
    assert spec.to_dict() == manifest


def test_an_inference_spec_built_in_code_writes_the_keys_it_sets():
    spec = InferenceSpec(batch_size=32, tta=("flip_lr",))
    assert spec.to_dict() == {"batch_size": 32, "tta": ["flip_lr"]}
    assert InferenceSpec.from_dict({"batch_size": 8, "tta": [], "temperature": 1.0}).to_dict() == {
        "batch_size": 8, "tta": [], "temperature": 1.0}  # defaults the JSON holds stay written


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: [1, 2], "must hold a JSON object, got list"),
        (lambda m: {**m, "schema_version": 2}, "schema_version 2; brainscan"),
        (lambda m: {k: v for k, v in m.items() if k != "weights"}, "missing field 'weights'"),
        (lambda m: {**m, "task": "detection"}, "task must be one of"),
        (lambda m: {**m, "demo": "yes"}, "demo must be bool"),
        (lambda m: {**m, "weights": {**m["weights"], "file": "../weights.npz"}}, "file name inside the bundle"),
        (lambda m: {**m, "preprocessing": {**m["preprocessing"], "kind": "image2d"}},
         "preprocessing.kind must be 'volume3d'"),
        (lambda m: {**m, "label_map": {"0": 0, "1": 3}}, "label_map must map output indices"),
        (lambda m: {**m, "inference": {**m["inference"], "overlap": 1.5}},
         r"inference.overlap must be a number in \[0, 1\)"),
        (lambda m: {**m, "inference": {**m["inference"], "mirror_axes": [3]}}, "inference.mirror_axes"),
        (lambda m: {**m, "preprocessing": {**m["preprocessing"], "algorithm_version": "1"}},
         "preprocessing.algorithm_version must be int"),
    ],
)
def test_a_bad_manifest_raises_the_bundle_error_read_manifest_gave(edit, message):
    manifest = edit(_load(REGION_UNET))
    with pytest.raises(BundleError, match=message) as info:
        Manifest.from_dict(manifest, source="bad/manifest.json")
    assert info.value.code == "bundle_invalid"
    if isinstance(manifest, dict) and manifest.get("schema_version") == 1:
        assert str(info.value).startswith("invalid manifest bad/manifest.json: ")
        assert len(validate_manifest(manifest)) == 1


def test_read_manifest_names_the_file_in_its_errors(tmp_path):
    manifest = _load(CLASSIFIER)
    manifest["inference"]["temperature"] = 0
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"invalid manifest .*manifest.json: inference.temperature must be"):
        read_manifest(tmp_path)
