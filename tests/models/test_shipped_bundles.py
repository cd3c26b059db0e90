"""The bundles committed under ``models/``: intact, within the size limit, and their figures reproducible.

The classifier checks rebuild the validation split the manifest names (same data, seed and
fraction) from the real Kaggle Training folder with ``brainscan evaluate --validation-split``, and
measure the shipped weights on it again: the README quotes these figures, so they must come back.

Figures are reproduced for the CURRENT version of each architecture, the one services load and the
README quotes. The older versions stay in the store for clients that pin one; every version's
weights are checked against their manifest's hash here, so none can change unnoticed, and
``BRAINSCAN_TEST_ALL_BUNDLES=1`` reproduces every version's figures again (about 4 minutes more on
2 cores).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from brainscan.cli.main import main  # noqa: E402
from brainscan.models.store import ModelStore  # noqa: E402
from tests.paths import BRATS_SAMPLE, KAGGLE_TRAINING, REPO_ROOT, needs_brats_sample, needs_kaggle  # noqa: E402

SHIPPED = ModelStore(REPO_ROOT / "models")
MAX_BUNDLE_BYTES = 60 * 1024 * 1024
CLASSIFIERS = SHIPPED.list("classification")
SEGMENTERS = SHIPPED.list("segmentation")
REAL_SEGMENTERS = [e for e in SEGMENTERS if not e.demo]
ALL_VERSIONS = os.environ.get("BRAINSCAN_TEST_ALL_BUNDLES") == "1"


def _figured(entries):
    """The bundles whose figures are reproduced: the current ones (all with BRAINSCAN_TEST_ALL_BUNDLES=1)."""
    return list(entries) if ALL_VERSIONS else [e for e in entries if e.current]


FIGURED_CLASSIFIERS = _figured(CLASSIFIERS)
FIGURED_SEGMENTERS = _figured(REAL_SEGMENTERS)
BRATS_TRAIN = BRATS_SAMPLE.parents[1] / "brats-train"
# float16 weights and another summation order move a few boundary voxels: Dice within 0.01.
DICE_TOLERANCE = 0.01
# float16 storage of the weights may flip a borderline prediction or two of ~860.
ACCURACY_TOLERANCE = 0.005


def _ids(entries) -> list[str]:
    return [f"{e.arch}-{e.version}" for e in entries]


def test_models_are_shipped() -> None:
    assert {e.arch for e in CLASSIFIERS} >= {"resnet50"}
    assert {e.arch for e in SEGMENTERS} == {"unet3d", "attention_unet3d"}
    # the served segmenters are trained on real BraTS cases, not the phantom demos
    assert {e.arch for e in REAL_SEGMENTERS if e.current} == {"unet3d", "attention_unet3d"}


@pytest.mark.skipif(not BRATS_TRAIN.is_dir(), reason=f"real BraTS cases not found at {BRATS_TRAIN}")
@pytest.mark.slow
@pytest.mark.parametrize("entry", FIGURED_SEGMENTERS, ids=_ids(FIGURED_SEGMENTERS))
def test_evaluate_reproduces_the_validation_dice(entry, tmp_path, capsys) -> None:
    """The README's figures: `brainscan evaluate` on the manifest's validation cases gives its Dice again."""
    from brainscan.models.bundle import read_manifest

    manifest = read_manifest(entry.path)
    cases = tmp_path / "validation"
    cases.mkdir()
    for case_id in manifest["training"]["validation_case_ids"]:
        found = [d for d in (BRATS_TRAIN / case_id, BRATS_SAMPLE.parent / case_id) if d.is_dir()]
        assert found, f"validation case {case_id} is in neither {BRATS_TRAIN} nor {BRATS_SAMPLE.parent}"
        (cases / case_id).symlink_to(found[0])
    out = tmp_path / "report"
    assert main(["evaluate", str(entry.path), str(cases), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    for region in ("WT", "TC", "ET"):
        measured = report["aggregate"][region]["dice"]["mean"]
        expected = manifest["metrics"]["dice"][region]
        print(f"{entry.arch}-{entry.version} {region}: Dice {measured:.4f} (manifest {expected:.4f})")
        assert measured == pytest.approx(expected, abs=DICE_TOLERANCE)


@pytest.mark.parametrize("entry", CLASSIFIERS + SEGMENTERS, ids=_ids(CLASSIFIERS + SEGMENTERS))
def test_bundle_is_intact_and_small_enough(entry) -> None:
    from brainscan.models.bundle import load_bundle

    size = sum(p.stat().st_size for p in entry.path.rglob("*") if p.is_file())
    assert size <= MAX_BUNDLE_BYTES
    bundle = load_bundle(entry.path)  # verifies the weights' sha256 against the manifest
    manifest = bundle.manifest
    training = manifest["training"]
    assert training["command"].startswith(("brainscan train ", "brainscan models ensure-demo"))
    assert len(training["data_fingerprint"]) == 64 or manifest["demo"]
    assert isinstance(training["epochs"], int) and isinstance(training["seed"], int)
    if entry.task == "segmentation" and not manifest["demo"]:
        assert manifest["inference"]["outputs"] == "regions"
        assert manifest["preprocessing"]["params"]["target_spacing"] > 0
        dice = manifest["metrics"]["dice"]
        assert all(0.0 <= dice[r] <= 1.0 for r in ("WT", "TC", "ET"))
        assert manifest["metrics"]["validation_cases"] == len(training["validation_case_ids"]) > 0
        assert not set(training["validation_case_ids"]) & set(training.get("training_case_ids") or [])
    elif entry.task == "segmentation":
        assert "phantom" in training["data_description"] or training["command"].startswith("brainscan models")
    else:
        assert manifest["demo"] is False
        assert "Testing" not in training["data_description"].replace("Training split only", "")
        validation = manifest["metrics"]["validation"]
        assert 0.0 <= validation["accuracy"] <= 1.0 and manifest["metrics"]["validation_images"] > 0


@needs_kaggle
@pytest.mark.slow
@pytest.mark.parametrize("entry", FIGURED_CLASSIFIERS, ids=_ids(FIGURED_CLASSIFIERS))
def test_evaluate_reproduces_the_validation_accuracy(entry, tmp_path, capsys) -> None:
    """The README's command: `brainscan evaluate BUNDLE ../shared/data/brain-tumor-mri --validation-split`."""
    from brainscan.models.bundle import read_manifest

    manifest = read_manifest(entry.path)
    out = tmp_path / "report"
    assert main(["evaluate", str(entry.path), str(KAGGLE_TRAINING.parent), "--validation-split", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert list(report["splits"]) == ["Validation"]
    section = report["splits"]["Validation"]
    expected = manifest["metrics"]["validation"]
    print(f"{entry.arch}-{entry.version}: validation accuracy {section['accuracy']:.4f} "
          f"(manifest {expected['accuracy']:.4f})")
    assert section["n_samples"] == manifest["metrics"]["validation_images"]
    difference = np.subtract(section["confusion_matrix"]["matrix"], expected["confusion_matrix"]["matrix"])
    assert np.abs(difference).sum() <= 2 * round(ACCURACY_TOLERANCE * section["n_samples"])
    assert section["accuracy"] == pytest.approx(expected["accuracy"], abs=ACCURACY_TOLERANCE)
    assert f"Validation: accuracy {section['accuracy']:.4f}" in printed
    assert any("selected on" in w for w in report["warnings"])
    for figure in ("confusion_matrix.png", "per_class_metrics.png"):
        assert (out / figure).stat().st_size > 10_000
    assert "confusion_matrix.png" in (out / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("entry", FIGURED_CLASSIFIERS, ids=_ids(FIGURED_CLASSIFIERS))
def test_evaluate_runs_on_a_kaggle_layout_folder(entry, tmp_path, capsys) -> None:
    """Works without the real data too: phantoms written as a Testing split."""
    from brainscan.data.phantoms.kaggle import write_kaggle_phantoms

    write_kaggle_phantoms(tmp_path / "kaggle", n=16, seed=3, size=160, split="Testing")
    out = tmp_path / "report"
    assert main(["evaluate", str(entry.path), str(tmp_path / "kaggle"), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["Testing"]["n_samples"] == 16
    assert "Testing: accuracy" in capsys.readouterr().out
    assert (out / "confusion_matrix.png").is_file()


@needs_brats_sample
@pytest.mark.slow
@pytest.mark.parametrize("entry", FIGURED_SEGMENTERS, ids=_ids(FIGURED_SEGMENTERS))
def test_predict_segment_real_case_with_shipped_unet(entry, tmp_path, capsys) -> None:
    from brainscan.io.nifti import load_nifti

    out = tmp_path / "mask.nii.gz"
    assert main(["predict", "segment", str(entry.path), str(BRATS_SAMPLE), "--out", str(out), "--json",
                 "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    reference = load_nifti(BRATS_SAMPLE / f"{BRATS_SAMPLE.name}_flair.nii.gz")
    mask = load_nifti(out)
    assert mask.data.shape == reference.data.shape == (240, 240, 155)
    np.testing.assert_allclose(mask.affine, reference.affine)
    assert set(np.unique(mask.data)) <= {0, 1, 2, 4}
    assert result["shape"] == [240, 240, 155]

