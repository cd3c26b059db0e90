"""`brainscan evaluate` and the prediction functions behind it, on phantoms and tiny untrained bundles.

Expected values are computed here by an independent path (the bundle's model called directly on
``bundle.preprocess`` output, the metrics on masks read back from disk), never copied from a run.
"""

from __future__ import annotations

import csv
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from brainscan.cli.main import main
from brainscan.labels import KAGGLE_CLASSES, REGIONS
from tests.bundles import make_classifier_store
from tests.evaluation import make_segmenter_bundle

KAGGLE_SPLITS = {"Training": 20, "Testing": 8}
PHANTOM_SHAPE = (48, 48, 32)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_classifier_store(tmp_path_factory.mktemp("store"), archs=("resnet50",))
    return root / "classification" / "resnet50" / "test-1"


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_segmenter_bundle(tmp_path_factory.mktemp("seg") / "unet3d-test-1")


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from brainscan.data.phantoms import write_kaggle_phantoms

    root = tmp_path_factory.mktemp("kaggle")
    for split, n in KAGGLE_SPLITS.items():
        write_kaggle_phantoms(root, n=n, seed=1, size=96, split=split)
    return root


@pytest.fixture(scope="module")
def brats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from brainscan.data.phantoms import write_brats_phantoms

    root = tmp_path_factory.mktemp("brats")
    write_brats_phantoms(root, n=2, seed=4, shape=PHANTOM_SHAPE)
    return root


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", raw[16:24])


def _assert_figure(path: Path) -> None:
    width, height = _png_size(path)
    assert width >= 400 and height >= 300
    assert path.stat().st_size > 10_000, f"{path.name} looks blank"


def _direct_probabilities(bundle_path: Path, files: list[Path]) -> np.ndarray:
    """The bundle's model called eagerly on ``bundle.preprocess`` output: no batching, no tf.function."""
    from brainscan.models.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    batch = np.stack([bundle.preprocess(f.read_bytes()) for f in files])
    return np.asarray(bundle.model(batch, training=False))


def test_evaluate_kaggle_writes_report_per_split(classifier: Path, kaggle_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(["evaluate", str(classifier), str(kaggle_dir), "--out", str(out), "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())

    assert report["task"] == "classification"
    assert {key: report["bundle"][key] for key in ("name", "version", "demo", "architecture", "path")} == {
        "name": "resnet50-test-1", "version": "test-1", "demo": True, "architecture": "resnet50",
        "path": str(classifier)}
    assert report["data"]["path"] == str(kaggle_dir)
    assert sorted(report["splits"]) == sorted(KAGGLE_SPLITS)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == sum(KAGGLE_SPLITS.values())
    for split, n in KAGGLE_SPLITS.items():
        files = sorted((kaggle_dir / split).glob("*/*.jpg"))
        truth = np.array([KAGGLE_CLASSES.index(f.parent.name) for f in files])
        probabilities = _direct_probabilities(classifier, files)
        predicted = probabilities.argmax(axis=1)
        section = report["splits"][split]
        assert report["counts"]["evaluated"][split] == {c: n // 4 for c in KAGGLE_CLASSES}
        assert section["n_samples"] == n
        assert section["accuracy"] == pytest.approx(float(np.mean(predicted == truth)))
        expected_matrix = np.zeros((4, 4), dtype=int)
        np.add.at(expected_matrix, (truth, predicted), 1)
        assert section["confusion_matrix"]["matrix"] == expected_matrix.tolist()
        by_path = {row["path"]: row for row in rows}
        for file, probs in zip(files, probabilities):
            assert by_path[str(file)]["predicted"] == KAGGLE_CLASSES[int(probs.argmax())]
            assert float(by_path[str(file)]["confidence"]) == pytest.approx(float(probs.max()), abs=1e-4)
        assert f"{split}: accuracy {section['accuracy']:.4f}" in captured.out

    markdown = (out / "report.md").read_text()
    for text in ("## Split: Training", "## Split: Testing", "DEMO bundle", "confusion_matrix.png"):
        assert text in markdown
    _assert_figure(out / "confusion_matrix.png")
    _assert_figure(out / "per_class_metrics.png")
    assert any("training split" in w for w in report["warnings"])
    assert "WARNING: DEMO bundle" in captured.err
    assert report["timing"]["total_s"] >= report["timing"]["evaluate_s"] > 0


@pytest.mark.parametrize("limit, expected", [
    ("3", {"Training": 3, "Testing": 3}),
    ("12", {"Training": 12, "Testing": 8}),   # Testing has only 8 images
])
def test_evaluate_limit_samples_each_split(classifier: Path, kaggle_dir: Path, tmp_path: Path, limit: str,
                                           expected: dict[str, int]) -> None:
    out = tmp_path / "report"
    assert main(["evaluate", str(classifier), str(kaggle_dir), "--out", str(out), "--limit", limit, "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {split: sum(counts.values()) for split, counts in report["counts"]["evaluated"].items()} == expected
    assert {split: s["n_samples"] for split, s in report["splits"].items()} == expected
    assert report["data"]["limit"] == int(limit)


def test_evaluate_skips_undecodable_images_and_flags_training_data(classifier: Path, kaggle_dir: Path,
                                                                  tmp_path: Path) -> None:
    from brainscan.data.kaggle import dataset_fingerprint, read_kaggle_folder

    data = tmp_path / "kaggle"
    shutil.copytree(kaggle_dir / "Training", data / "Training")
    truncated = data / "Training" / "glioma" / "Tr-gl_9999.jpg"
    truncated.write_bytes(next((data / "Training" / "glioma").glob("*.jpg")).read_bytes()[:300])
    # The bundle claims it was trained on exactly this split (as training/classifier.py records it).
    bundle = tmp_path / "bundle"
    shutil.copytree(classifier, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["training"]["data_fingerprint"] = dataset_fingerprint(read_kaggle_folder(data).select("Training"))
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    out = tmp_path / "report"
    assert main(["evaluate", str(bundle), str(data), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    training = report["splits"]["Training"]
    assert training["n_samples"] == KAGGLE_SPLITS["Training"]
    assert [f["path"] for f in training["failed"]] == [str(truncated)]
    assert training["failed"][0]["error"] == "corrupt_file"
    assert sum(report["counts"]["evaluated"]["Training"].values()) == KAGGLE_SPLITS["Training"]
    assert any("trained on exactly the images of split 'Training'" in w for w in report["warnings"])
    assert any("could not be decoded" in w for w in report["warnings"])


def test_evaluate_brats_matches_metrics_of_saved_masks(segmenter: Path, brats_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from brainscan.io.nifti import load_nifti
    from brainscan.metrics.segmentation import segmentation_metrics

    out = tmp_path / "report"
    assert main(["evaluate", str(segmenter), str(brats_dir), "--out", str(out), "--save-masks", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    case_dirs = sorted(p for p in brats_dir.iterdir() if p.is_dir())
    assert [c["case_id"] for c in report["cases"]] == [p.name for p in case_dirs]
    assert report["counts"] == {"cases_found": 2, "cases_with_seg": 2, "cases_evaluated": 2,
                                "skipped_without_seg": [], "failed": []}
    for case, folder in zip(report["cases"], case_dirs):
        mask = load_nifti(case["mask"])
        truth = load_nifti(folder / f"{folder.name}_seg.nii.gz")
        assert mask.shape == truth.shape == PHANTOM_SHAPE
        np.testing.assert_allclose(mask.affine, truth.affine)
        expected = segmentation_metrics(mask.data, truth.data, truth.spacing)
        for region in REGIONS:
            for metric in ("dice", "hd95", "volume_ml", "volume_ml_truth"):
                assert case["metrics"][region][metric] == pytest.approx(expected[region][metric])
    for region in REGIONS:
        dice = [c["metrics"][region]["dice"] for c in report["cases"]]
        assert report["aggregate"][region]["dice"]["mean"] == pytest.approx(np.mean(dice))

    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert [r["case_id"] for r in rows] == [p.name for p in case_dirs]
    assert float(rows[0]["dice_WT"]) == pytest.approx(report["cases"][0]["metrics"]["WT"]["dice"])
    markdown = (out / "report.md").read_text()
    assert all(f"| {p.name} |" in markdown for p in case_dirs)
    _assert_figure(out / "dice_boxplot.png")
    mean_wt = report["aggregate"]["WT"]["dice"]["mean"]
    assert f"WT {mean_wt:.4f}" in capsys.readouterr().out


def test_segment_case_equals_the_direct_pipeline(segmenter: Path, brats_dir: Path) -> None:
    """One patch covering the whole preprocessed volume: sliding window must reduce to model(x)."""
    from brainscan.data.brats import find_case, load_case
    from brainscan.inference.segmenter import segment_case
    from brainscan.models.bundle import load_bundle
    from brainscan.preprocess.volume3d import preprocess_case, restore_to_original

    bundle = load_bundle(segmenter)
    loaded = load_case(find_case(sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]), with_seg=False)
    x, info = preprocess_case(loaded.channels, bundle.preprocess_config)
    probabilities = np.asarray(bundle.model(x[None], training=False))[0]
    brats_labels = np.array([bundle.label_map[k] for k in range(len(bundle.label_map))], dtype=np.uint8)
    expected = restore_to_original(brats_labels[probabilities.argmax(axis=-1)], info, fill=0)

    calls: list[tuple[int, int]] = []
    mask = segment_case(bundle, loaded, progress=lambda done, total: calls.append((done, total)),
                        inference={"patch_size": list(x.shape[:3]), "overlap": 0.0})
    assert mask.dtype == np.uint8 and mask.shape == loaded.channels.shape[1:]
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 4}
    # Graph and eager execution may round differently; a near-tie could flip a handful of voxels.
    assert np.mean(mask != expected) < 1e-4
    assert calls == [(1, 1)]


@pytest.mark.parametrize("channels_shape, reference_shape, error", [
    ((3, 16, 16, 16), None, "BadDimensionsError"),
    ((4, 16, 16, 16), (16, 16, 8), "VolumeMismatchError"),
])
def test_segment_case_rejects_bad_input(segmenter: Path, channels_shape: tuple[int, ...],
                                        reference_shape: tuple[int, ...] | None, error: str) -> None:
    from types import SimpleNamespace

    from brainscan import errors
    from brainscan.inference.segmenter import segment_case
    from brainscan.models.bundle import load_bundle

    reference = SimpleNamespace(shape=reference_shape) if reference_shape else None
    with pytest.raises(getattr(errors, error)):
        segment_case(load_bundle(segmenter), np.ones(channels_shape, np.float32), reference)


def _no_seg_dataset(brats_dir: Path, root: Path) -> Path:
    case = sorted(p for p in brats_dir.iterdir() if p.is_dir())[0]
    (root / case.name).mkdir(parents=True)
    for file in case.iterdir():
        if not file.name.endswith("_seg.nii.gz"):
            shutil.copy(file, root / case.name / file.name)
    return root


@pytest.mark.parametrize("bundle_name, data, message", [
    ("classifier", "brats", "is a classification model but"),
    ("segmenter", "kaggle", "is a segmentation model but"),
    ("classifier", "empty", "is empty"),
    ("segmenter", "no_seg", "has a segmentation"),
    ("segmenter", "missing", "no such file or folder"),
    ("nope", "kaggle", "neither a bundle folder nor"),
])
def test_evaluate_refuses_data_that_does_not_fit(bundle_name: str, data: str, message: str, classifier: Path,
                                                 segmenter: Path, kaggle_dir: Path, brats_dir: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = {"classifier": str(classifier), "segmenter": str(segmenter)}.get(bundle_name, bundle_name)
    (tmp_path / "empty").mkdir()
    folders = {"brats": brats_dir, "kaggle": kaggle_dir, "empty": tmp_path / "empty",
               "no_seg": _no_seg_dataset(brats_dir, tmp_path / "no_seg"), "missing": tmp_path / "missing"}
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["evaluate", bundle, str(folders[data]), "--out", str(out), "--models-root",
                 str(tmp_path / "store"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("brainscan: error: ") or "\nbrainscan: error: " in err
    assert message in err
    assert not (out / "report.json").exists()
