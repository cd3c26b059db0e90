"""`brainscan predict classify|segment` on phantoms (and the real BraTS sample) with tiny untrained bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brainscan.cli.main import main
from brainscan.labels import BRATS2021, BRATS2023, BRATS2023_MODALITIES, KAGGLE_CLASSES
from tests.bundles import make_classifier_store
from tests.evaluation import make_segmenter_bundle
from tests.paths import BRATS_SAMPLE, needs_brats_sample


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_classifier_store(tmp_path_factory.mktemp("store"), archs=("resnet50",))
    make_segmenter_bundle(root / "segmentation" / "unet3d" / "test-1")
    # Coarse patches without overlap: a 240x240x155 case in a few network calls.
    make_segmenter_bundle(root / "segmentation" / "unet3d" / "fast-1", patch_size=(64, 64, 64), overlap=0.0,
                          version="fast-1")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from brainscan.data.phantoms import encode_jpeg, make_kaggle_phantom

    folder = tmp_path_factory.mktemp("images")
    paths = {"glioma": folder / "glioma.jpg", "pituitary": folder / "pituitary.jpg", "text": folder / "notes.txt"}
    paths["glioma"].write_bytes(encode_jpeg(make_kaggle_phantom("glioma", 7, size=96)))
    paths["pituitary"].write_bytes(encode_jpeg(make_kaggle_phantom("pituitary", 8, size=96)))
    paths["text"].write_text("not an image\n")
    return paths


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from brainscan.data.phantoms import write_brats_phantoms

    return write_brats_phantoms(tmp_path_factory.mktemp("brats"), n=1, seed=2, shape=(48, 48, 32))[0]


def _direct_probabilities(bundle_path: Path, files: list[Path]) -> np.ndarray:
    from brainscan.models.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    return np.asarray(bundle.model(np.stack([bundle.preprocess(f.read_bytes()) for f in files]), training=False))


COMMANDS = [["evaluate"], ["predict"], ["predict", "classify"], ["predict", "segment"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_new_commands_have_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: brainscan")


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_classify_reports_good_images_and_fails_bad_ones(store: Path, images: dict[str, Path], as_json: bool,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bundle = store / "classification" / "resnet50" / "test-1"
    argv = ["predict", "classify", str(bundle), str(images["glioma"]), str(images["text"]), str(images["pituitary"])]
    capsys.readouterr()
    assert main(argv + (["--json"] if as_json else [])) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [err.strip()], "one error line for the one bad image"
    assert str(images["text"]) in err and "not a PNG, JPEG" in err

    good = [images["glioma"], images["pituitary"]]
    expected = _direct_probabilities(bundle, good)
    if as_json:
        results = json.loads(out)
        assert [r["image"] for r in results] == [str(images[k]) for k in ("glioma", "text", "pituitary")]
        assert results[1]["error"] == "unsupported_format"
        for result, probs in zip([results[0], results[2]], expected):
            assert result["label"] == KAGGLE_CLASSES[int(probs.argmax())]
            assert [result["probabilities"][c] for c in KAGGLE_CLASSES] == pytest.approx(probs.tolist(), abs=1e-4)
    else:
        lines = out.splitlines()
        assert lines[0].startswith("model: resnet50-test-1") and "DEMO" in lines[0]
        for path, probs in zip(good, expected):
            row = next(line.split() for line in lines if line.startswith(str(path)))
            assert row[1] == KAGGLE_CLASSES[int(probs.argmax())]
            assert [float(v) for v in row[2:]] == pytest.approx(probs.tolist(), abs=2e-4)
        assert str(images["text"]) not in out


@pytest.mark.parametrize("spec", ["resnet50", "classification/resnet50", "folder"])
def test_classify_finds_the_bundle_by_store_name_or_folder(spec: str, store: Path, images: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    bundle = str(store / "classification" / "resnet50" / "test-1") if spec == "folder" else spec
    capsys.readouterr()
    assert main(["predict", "classify", bundle, str(images["glioma"]), "--json", "--models-root", str(store)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["label"] in KAGGLE_CLASSES
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def _check_mask(mask_path: Path, flair_path: Path) -> np.ndarray:
    from brainscan.io.nifti import load_nifti

    mask, flair = load_nifti(mask_path), load_nifti(flair_path)
    assert mask.data.dtype == np.uint8
    assert mask.shape == flair.shape
    np.testing.assert_allclose(mask.affine, flair.affine)
    assert set(np.unique(mask.data).tolist()) <= {0, 1, 2, 4}
    return mask.data


def test_segment_writes_mask_on_the_input_grid(store: Path, case_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from brainscan.metrics.segmentation import volumes_ml

    out = tmp_path / "pred" / "mask.nii.gz"
    capsys.readouterr()
    assert main(["predict", "segment", "unet3d", str(case_dir), "--out", str(out), "--json",
                 "--models-root", str(store), "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    mask = _check_mask(out, case_dir / f"{case_dir.name}_flair.nii.gz")
    assert result["mask"] == str(out) and result["shape"] == list(mask.shape)
    assert result["labels_present"] == [v for v in (1, 2, 4) if (mask == v).any()]
    expected = volumes_ml(mask, result["spacing_mm"])
    assert result["volumes_ml"] == pytest.approx(expected)
    assert set(result["timings"]) == {"load_s", "segment_s", "write_s", "total_s"}


@pytest.fixture(scope="module")
def case_dir_2023(case_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom case under BraTS 2023-2024 names (``<case>-t1n.nii.gz``...), without its seg."""
    folder = tmp_path_factory.mktemp("brats2023") / "BraTS-GLI-00000-000"
    folder.mkdir()
    for name, modality in BRATS2023_MODALITIES.items():
        (folder / f"{folder.name}-{name}.nii.gz").symlink_to(case_dir / f"{case_dir.name}_{modality}.nii.gz")
    return folder


@pytest.mark.parametrize("layout, convention, enhancing", [("2021", BRATS2021, 4), ("2023", BRATS2023, 3)])
def test_segment_writes_the_labels_of_the_case_convention(layout: str, convention: str, enhancing: int, store: Path,
                                                          case_dir: Path, case_dir_2023: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import brainscan.inference.segmenter as segment
    from brainscan.io.nifti import load_nifti
    from brainscan.metrics.segmentation import volumes_ml

    folder = case_dir if layout == "2021" else case_dir_2023
    flair = load_nifti(case_dir / f"{case_dir.name}_flair.nii.gz")
    mask = np.zeros(flair.shape, np.uint8)
    mask[10:20, 10:20, 8:14] = 2
    mask[12:18, 12:18, 9:13] = 1
    mask[14:16, 14:16, 10:12] = 4
    monkeypatch.setattr(segment, "segment_case", lambda bundle, case, **kwargs: mask.copy())
    out = tmp_path / "mask.nii.gz"
    capsys.readouterr()
    assert main(["predict", "segment", "unet3d", str(folder), "--out", str(out), "--json",
                 "--models-root", str(store), "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    written = load_nifti(out)
    np.testing.assert_array_equal(written.data, np.where(mask == 4, enhancing, mask))
    np.testing.assert_allclose(written.affine, flair.affine)
    assert (result["label_convention"], result["labels_present"]) == (convention, [1, 2, enhancing])
    assert result["volumes_ml"] == pytest.approx(volumes_ml(mask, flair.spacing))
    assert main(["predict", "segment", "unet3d", str(folder), "--out", str(out), "--models-root", str(store),
                 "--quiet"]) == 0
    assert f"labels [1, 2, {enhancing}]" in capsys.readouterr().out


@needs_brats_sample
def test_segment_real_case_keeps_the_brats_grid(store: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "BraTS2021_00006_pred.nii.gz"
    bundle = store / "segmentation" / "unet3d" / "fast-1"
    assert main(["predict", "segment", str(bundle), str(BRATS_SAMPLE), "--out", str(out), "--quiet"]) == 0
    mask = _check_mask(out, BRATS_SAMPLE / "BraTS2021_00006_flair.nii.gz")
    assert mask.shape == (240, 240, 155)
    printed = capsys.readouterr().out
    assert "WT" in printed and "mL" in printed


@pytest.mark.parametrize("bundle, case, out_name, message", [
    ("segmentation/unet3d", "case", "mask.png", "--out must end in .nii or .nii.gz"),
    ("classification/resnet50", "case", "mask.nii.gz", "is a classification model"),
    ("segmentation/unet3d", "no_flair", "mask.nii.gz", "lacks flair"),
    ("segmentation/unknown", "case", "mask.nii.gz", "neither a bundle folder nor"),
])
def test_segment_errors_exit_2(bundle: str, case: str, out_name: str, message: str, store: Path, case_dir: Path,
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = case_dir
    if case == "no_flair":
        folder = tmp_path / case_dir.name
        folder.mkdir()
        for file in case_dir.iterdir():
            if "_flair" not in file.name:
                (folder / file.name).symlink_to(file)
    capsys.readouterr()
    assert main(["predict", "segment", bundle, str(folder), "--out", str(tmp_path / out_name),
                 "--models-root", str(store), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / out_name).exists()
