"""Tests of brainscan.models.bundle: round trips, manifest contents, preprocessing parity, and
every way a bundle can be broken."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import brainscan
from brainscan.errors import BundleError
from brainscan.labels import BRATS_LABEL_NAMES, BRATS_LABELS, KAGGLE_CLASSES, MODALITIES
from brainscan.models.bundle import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    load_bundle,
    preprocessor_from_manifest,
    read_manifest,
    save_bundle,
    validate_manifest,
)
from brainscan.models.registry import build_model
from brainscan.preprocess.image2d import ImagePreprocessConfig, preprocess_image
from brainscan.preprocess.volume3d import VolumePreprocessConfig, preprocess_case
from tests.paths import REPO_ROOT

# Non-default preprocessing, so that a bundle falling back to defaults would be caught.
IMAGE_CONFIG = ImagePreprocessConfig(input_size=32, channels=3, crop_to_head=True, normalization="zscore")
VOLUME_CONFIG = VolumePreprocessConfig(divisor=8, clip_zscore=3.0, crop_to_brain=True, margin=1)

TINY = {
    "resnet50": {"preset": "tiny", "input_size": 32, "channels": 3, "num_classes": 4},
    "vit_cnn": {"preset": "tiny", "input_size": 32, "channels": 3, "num_classes": 4},
    "unet3d": {"preset": "tiny"},
    "attention_unet3d": {"preset": "tiny"},
}
REQUIRED_FIELDS = ("schema_version", "name", "task", "architecture", "version", "demo", "created_at",
                   "code_version", "input", "preprocessing", "inference", "training", "metrics", "weights")


def _save(model: Any, path: Path, arch: str, **overrides: Any) -> Path:
    """save_bundle with the arguments each task needs; ``overrides`` replace or add keywords."""
    if arch in ("resnet50", "vit_cnn"):
        kwargs: dict[str, Any] = dict(task="classification", preprocessing=IMAGE_CONFIG, classes=KAGGLE_CLASSES)
    else:
        kwargs = dict(task="segmentation", preprocessing=VOLUME_CONFIG, inference={"patch_size": [16, 16, 16]})
    kwargs.update(architecture=arch, architecture_args=TINY[arch], version="v1")
    kwargs.update(overrides)
    return save_bundle(model, path, **kwargs)


def _input_batch(arch: str) -> np.ndarray:
    shape = (2, 32, 32, 3) if arch in ("resnet50", "vit_cnn") else (1, 16, 16, 16, 4)
    return np.random.default_rng(1).normal(size=shape).astype(np.float32)


def _edit_manifest(bundle: Path, edit: Any) -> None:
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    edit(manifest)
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {arch: build_model(arch, args) for arch, args in TINY.items()}


@pytest.fixture(scope="module")
def classifier_bundle(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine tiny-resnet bundle; tests that break bundles work on copies of it."""
    return _save(models["resnet50"], tmp_path_factory.mktemp("bundles") / "resnet", "resnet50",
                 metrics={"val_accuracy": np.float64(0.5)}, demo=True,
                 training={"epochs": 1, "seed": 0, "data_fingerprint": "sha256:abc", "optimizer": "adam"})


@pytest.fixture(scope="module")
def segmenter_bundle(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(models["unet3d"], tmp_path_factory.mktemp("bundles") / "unet", "unet3d",
                 inference={"patch_size": (16, 16, 16), "overlap": 0.25, "mirror_axes": [0, 1]})


@pytest.fixture
def broken_copy(classifier_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(classifier_bundle, tmp_path / "copy"))


@pytest.mark.parametrize(
    "arch, weights_dtype, atol",
    [
        ("resnet50", "float32", 0.0),
        ("vit_cnn", "float16", 1e-2),
        ("unet3d", "float32", 0.0),
        ("attention_unet3d", "float16", 1e-2),
    ],
)
def test_round_trip_predicts_like_the_saved_model(models, tmp_path, arch, weights_dtype, atol):
    model = models[arch]
    path = _save(model, tmp_path / arch, arch, weights_dtype=weights_dtype)
    bundle = load_bundle(path, precision="float32")  # the arithmetic of the saved model: weights alone differ
    x = _input_batch(arch)
    expected, got = model.predict(x, verbose=0), bundle.model.predict(x, verbose=0)
    if atol == 0.0:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    assert all(v.dtype == w.dtype for v, w in zip(bundle.model.weights, model.weights))


def test_float16_weights_halve_the_file(models, tmp_path):
    model = models["resnet50"]
    full = _save(model, tmp_path / "full", "resnet50", weights_dtype="float32")
    half = _save(model, tmp_path / "half", "resnet50", weights_dtype="float16")
    ratio = (half / WEIGHTS_FILE).stat().st_size / (full / WEIGHTS_FILE).stat().st_size
    assert 0.45 < ratio < 0.6
    with np.load(half / WEIGHTS_FILE) as npz:
        assert {npz[key].dtype for key in npz.files} == {np.dtype("float16")}
        assert list(npz.files) == [v.path for v in model.weights]


def test_classification_manifest_holds_every_field(classifier_bundle, models):
    manifest = read_manifest(classifier_bundle)
    assert [key for key in REQUIRED_FIELDS if key not in manifest] == []
    assert validate_manifest(manifest) == []
    assert manifest["schema_version"] == 1
    assert manifest["task"] == "classification"
    assert manifest["architecture"] == {"name": "resnet50", "args": TINY["resnet50"]}
    assert (manifest["version"], manifest["demo"], manifest["name"]) == ("v1", True, "resnet50-v1")
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 3600
    assert manifest["code_version"]["brainscan"] == brainscan.__version__
    assert manifest["input"] == {"shape": [32, 32, 3], "dtype": "float32", "channels": 3}
    assert manifest["classes"] == list(KAGGLE_CLASSES)
    assert "label_map" not in manifest
    assert manifest["preprocessing"] == {"kind": "image2d", "params": IMAGE_CONFIG.to_dict(), "algorithm_version": 1}
    assert manifest["metrics"] == {"val_accuracy": 0.5}
    assert manifest["training"]["optimizer"] == "adam"
    assert {"data_fingerprint", "data_description", "command", "epochs", "seed"} <= set(manifest["training"])
    weights = manifest["weights"]
    assert weights["file"] == WEIGHTS_FILE and weights["dtype"] == "float32"
    assert weights["sha256"] == hashlib.sha256((classifier_bundle / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert weights["num_parameters"] == models["resnet50"].count_params()


def test_segmentation_manifest_holds_label_map_and_inference(segmenter_bundle):
    manifest = read_manifest(segmenter_bundle)
    assert manifest["label_map"] == {str(i): label for i, label in enumerate(BRATS_LABELS)}
    assert manifest["label_names"] == {str(i): BRATS_LABEL_NAMES[label] for i, label in enumerate(BRATS_LABELS)}
    assert "classes" not in manifest
    assert manifest["input"]["modalities"] == list(MODALITIES)
    assert manifest["input"]["channels"] == len(MODALITIES)
    assert manifest["preprocessing"] == {"kind": "volume3d", "params": VOLUME_CONFIG.to_dict(), "algorithm_version": 1}
    assert manifest["inference"] == {"patch_size": [16, 16, 16], "overlap": 0.25, "batch_size": 1,
                                     "mirror_axes": [0, 1]}


def test_bundle_properties(classifier_bundle, segmenter_bundle):
    classifier = load_bundle(classifier_bundle / MANIFEST_FILE, compile=True)
    segmenter = load_bundle(segmenter_bundle)
    assert (classifier.task, classifier.name, classifier.version, classifier.demo) == (
        "classification", "resnet50-v1", "v1", True)
    assert classifier.classes == KAGGLE_CLASSES and classifier.label_map is None
    assert classifier.path == classifier_bundle and classifier.architecture == "resnet50"
    assert segmenter.label_map == dict(enumerate(BRATS_LABELS)) and segmenter.classes is None
    assert segmenter.inference["overlap"] == 0.25
    assert segmenter.spec.inference.overlap == 0.25 and segmenter.spec.inference.mirror_axes == (0, 1)
    assert classifier.spec.preprocessing.version_recorded and classifier.spec.preprocessing.algorithm_version == 1
    assert classifier.spec.to_dict() == classifier.manifest == read_manifest(classifier_bundle)


def _synthetic_head_png() -> bytes:
    image = np.zeros((80, 64), dtype=np.uint8)
    cv2.ellipse(image, (32, 40), (24, 30), 0, 0, 360, 180, thickness=-1)
    cv2.circle(image, (38, 30), 6, 250, thickness=-1)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


@pytest.mark.parametrize("as_array", [False, True])
def test_classification_preprocess_matches_image2d(classifier_bundle, as_array):
    bundle = load_bundle(classifier_bundle)
    raw = _synthetic_head_png()
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE) if as_array else raw
    assert bundle.preprocess_config == IMAGE_CONFIG
    np.testing.assert_array_equal(bundle.preprocess(image), preprocess_image(image, IMAGE_CONFIG))


def test_segmentation_preprocess_matches_volume3d(segmenter_bundle):
    bundle = load_bundle(segmenter_bundle)
    rng = np.random.default_rng(2)
    channels = np.zeros((4, 20, 18, 12), dtype=np.float32)
    channels[:, 3:15, 4:14, 2:10] = rng.normal(100, 20, size=(4, 12, 10, 8))
    got, got_info = bundle.preprocess(channels)
    expected, expected_info = preprocess_case(channels, VOLUME_CONFIG)
    np.testing.assert_array_equal(got, expected)
    assert got_info == expected_info


def test_preprocess_comes_from_the_manifest_only(classifier_bundle):
    manifest = read_manifest(classifier_bundle)
    manifest["preprocessing"]["params"]["normalization"] = "zero_one"
    config, preprocess = preprocessor_from_manifest(manifest)
    assert config == ImagePreprocessConfig(input_size=32, channels=3, crop_to_head=True, normalization="zero_one")
    raw = _synthetic_head_png()
    np.testing.assert_array_equal(preprocess(raw), preprocess_image(raw, config))


def _flip_bytes(bundle: Path) -> None:
    weights = bundle / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    weights.write_bytes(bytes(data))


def _replace_weights_with_garbage(bundle: Path) -> None:
    """Not an npz at all, but with a matching checksum, as a buggy exporter might write."""
    garbage = b"this is not a zip file" * 10
    (bundle / WEIGHTS_FILE).write_bytes(garbage)
    _edit_manifest(bundle, lambda m: m["weights"].update(sha256=hashlib.sha256(garbage).hexdigest()))


def _set(*keys: str, value: Any) -> Any:
    def edit(manifest: dict[str, Any]) -> None:
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return lambda bundle: _edit_manifest(bundle, edit)


CORRUPTIONS = [
    # (case, how to break the copy, expected message fragment, error code)
    ("missing_dir", lambda b: shutil.rmtree(b), "not found", "bundle_not_found"),
    ("missing_manifest", lambda b: (b / MANIFEST_FILE).unlink(), "has no manifest.json", "bundle_invalid"),
    ("invalid_json", lambda b: (b / MANIFEST_FILE).write_text("{not json"), "not valid JSON", "bundle_invalid"),
    ("not_an_object", lambda b: (b / MANIFEST_FILE).write_text("[1, 2]"), "JSON object", "bundle_invalid"),
    ("unknown_schema", _set("schema_version", value=2), "schema_version 2", "bundle_invalid"),
    ("missing_field", lambda b: _edit_manifest(b, lambda m: m.pop("weights")), "missing field 'weights'",
     "bundle_invalid"),
    ("escaping_weights_file", _set("weights", "file", value="../weights.npz"), "file name inside the bundle",
     "bundle_invalid"),
    ("unknown_architecture", _set("architecture", "name", value="no_such_net"),
     "unknown architecture 'no_such_net'", "bundle_invalid"),
    ("wrong_task_architecture", _set("architecture", "name", value="unet3d"), "is segmentation",
     "bundle_invalid"),
    ("missing_weights", lambda b: (b / WEIGHTS_FILE).unlink(), "weights.npz is missing", "bundle_invalid"),
    ("flipped_bytes", _flip_bytes, "corrupt or was modified", "bundle_invalid"),
    ("weights_not_npz", _replace_weights_with_garbage, "cannot read weights.npz", "bundle_invalid"),
    ("args_change_shapes", _set("architecture", "args", "num_classes", value=3),
     r"logits/kernel has shape \(256, 3\) but weights hold \(256, 4\)", "bundle_invalid"),
    ("args_unknown_keyword", _set("architecture", "args", "no_such_arg", value=1), "cannot build",
     "bundle_invalid"),
    ("bad_preprocessing_params", _set("preprocessing", "params", "input_size", value=5),
     "preprocessing params", "bundle_invalid"),
    ("classes_disagree_with_outputs", _set("classes", value=["a", "b", "c"]), "4 outputs but the manifest names 3",
     "bundle_invalid"),
]


@pytest.mark.parametrize("case, corrupt, message, code", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_broken_bundle_raises_bundle_error(broken_copy, case, corrupt, message, code):
    corrupt(broken_copy)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(broken_copy)
    assert info.value.code == code and info.value.http_status == 503


SAVE_ERRORS = [
    # (case, save_bundle overrides, exception type, message fragment)
    ("bad_task", dict(task="detection"), ValueError, "task must be one of"),
    ("bad_weights_dtype", dict(weights_dtype="int8"), ValueError, "weights_dtype"),
    ("version_not_a_folder_name", dict(version="../v1"), ValueError, "version must match"),
    ("unknown_architecture", dict(architecture="no_such_net"), ValueError, "unknown architecture"),
    ("architecture_of_other_task", dict(architecture="unet3d"), ValueError, "is a segmentation network"),
    ("args_do_not_rebuild_model", dict(architecture_args={**TINY["resnet50"], "num_classes": 3}), ValueError,
     "do not match"),
    ("too_few_classes", dict(classes=KAGGLE_CLASSES[:3]), ValueError, "4 outputs but 3 classes"),
    ("duplicate_classes", dict(classes=("a", "a", "b", "c")), ValueError, "unique"),
    ("label_map_for_classifier", dict(label_map={0: 0}), ValueError, "label_map is for segmentation"),
    ("volume_config_for_classifier", dict(preprocessing=VOLUME_CONFIG), TypeError, "ImagePreprocessConfig"),
    ("config_size_differs_from_model", dict(preprocessing=ImagePreprocessConfig(input_size=64)), ValueError,
     "preprocessing makes"),
    ("nan_metric", dict(metrics={"val_accuracy": float("nan")}), ValueError, "'metrics' cannot be written as JSON"),
]


@pytest.mark.parametrize("case, overrides, error, message", SAVE_ERRORS, ids=[c[0] for c in SAVE_ERRORS])
def test_save_rejects_bad_arguments(models, tmp_path, case, overrides, error, message):
    with pytest.raises(error, match=message):
        _save(models["resnet50"], tmp_path / "bundle", "resnet50", **overrides)
    assert not (tmp_path / "bundle").exists()


SEGMENTATION_SAVE_ERRORS = [
    ("no_patch_size", dict(inference={}), "patch_size"),
    ("overlap_of_one", dict(inference={"patch_size": [16, 16, 16], "overlap": 1.0}), "overlap"),
    ("mirror_axis_3", dict(inference={"patch_size": [16, 16, 16], "mirror_axes": [3]}), "mirror_axes"),
    ("non_brats_label", dict(label_map={0: 0, 1: 1, 2: 2, 3: 3}), "BraTS labels"),
    ("label_map_too_short", dict(label_map={0: 0, 1: 1}), "4 output channels"),
    ("three_modalities", dict(modalities=MODALITIES[:3]), "4 channels but 3 modalities"),
    ("classes_for_segmenter", dict(classes=KAGGLE_CLASSES), "classes is for classification"),
]


@pytest.mark.parametrize("case, overrides, message", SEGMENTATION_SAVE_ERRORS,
                         ids=[c[0] for c in SEGMENTATION_SAVE_ERRORS])
def test_save_rejects_bad_segmentation_arguments(models, tmp_path, case, overrides, message):
    with pytest.raises(ValueError, match=message):
        _save(models["unet3d"], tmp_path / "bundle", "unet3d", **overrides)


def test_float16_overflow_is_refused(tmp_path):
    model = build_model("vit_cnn", TINY["vit_cnn"])
    weights = model.get_weights()
    weights[0] = np.full_like(weights[0], 1e6)
    model.set_weights(weights)
    with pytest.raises(ValueError, match="not finite when stored as float16"):
        _save(model, tmp_path / "bundle", "vit_cnn", weights_dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_unless_asked(models, classifier_bundle, tmp_path):
    path = Path(shutil.copytree(classifier_bundle, tmp_path / "bundle"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _save(models["resnet50"], path, "resnet50", version="v2")
    assert read_manifest(path)["version"] == "v1"
    _save(models["resnet50"], path, "resnet50", version="v2", overwrite=True)
    assert read_manifest(path)["version"] == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temp or old folders left


def test_overwrite_never_replaces_a_folder_that_is_not_a_bundle(models, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model bundle"):
        _save(models["resnet50"], folder, "resnet50", overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_failed_write_leaves_nothing_behind(models, tmp_path, monkeypatch):
    import brainscan.models.bundle as bundle_module

    def broken_sha256(path: Path) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "_sha256", broken_sha256)
    with pytest.raises(OSError, match="disk full"):
        _save(models["resnet50"], tmp_path / "bundle", "resnet50")
    assert list(tmp_path.iterdir()) == []


def test_save_works_without_git(models, tmp_path, monkeypatch):
    monkeypatch.delenv("BRAINSCAN_GIT_COMMIT", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries-here"))
    path = _save(models["vit_cnn"], tmp_path / "bundle", "vit_cnn")
    assert read_manifest(path)["code_version"] == {"brainscan": brainscan.__version__, "git_commit": None}


def test_read_manifest_does_not_import_tensorflow(classifier_bundle):
    code = (
        "import sys\n"
        "from brainscan.models import bundle\n"
        f"manifest = bundle.read_manifest({str(classifier_bundle)!r})\n"
        "assert manifest['task'] == 'classification'\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: m.update(task="detection"), "task must be one of"),
        (lambda m: m.update(demo="yes"), "demo must be bool"),
        (lambda m: m.update(created_at="yesterday"), "created_at must be ISO 8601"),
        (lambda m: m["weights"].update(sha256="abc"), "weights.sha256"),
        (lambda m: m["weights"].update(dtype="int8"), "weights.dtype"),
        (lambda m: m["preprocessing"].update(kind="volume3d"), "preprocessing.kind must be 'image2d'"),
        (lambda m: m.update(classes=[]), "classes must be a non-empty list"),
        (lambda m: m.update(version="a/b"), "version must match"),
    ],
)
def test_validate_manifest_names_the_problem(classifier_bundle, edit, problem):
    manifest = read_manifest(classifier_bundle)
    edit(manifest)
    problems = validate_manifest(manifest)
    assert len(problems) == 1 and problem in problems[0], problems
