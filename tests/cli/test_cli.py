"""The `brainscan` command line: help texts, the data/metrics/models commands, and error exits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainscan.cli.main import build_parser, main
from tests.paths import BRATS_SAMPLE, KAGGLE_TRAINING, needs_brats_sample, needs_kaggle

COMMANDS = [
    [],
    ["data"],
    ["data", "inspect"],
    ["data", "phantoms"],
    ["metrics"],
    ["metrics", "segmentation"],
    ["models"],
    ["models", "list"],
    ["models", "promote"],
    ["train"],
    ["train", "classifier"],
    ["train", "segmenter"],
    ["models", "ensure-demo"],
    ["up"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "brainscan")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: brainscan")
    assert len(out.splitlines()) > 3


def test_console_script_is_declared() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["brainscan"] == "brainscan.cli.main:main"
    assert build_parser().prog == "brainscan"


@pytest.fixture(scope="module")
def kaggle_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kaggle")
    assert main(["data", "phantoms", "--layout", "kaggle", "--out", str(out), "--n", "40", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def brats_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("brats")
    assert main(["data", "phantoms", "--layout", "brats", "--out", str(out), "--n", "2", "--seed", "5"]) == 0
    return out


def test_inspect_kaggle_phantoms(kaggle_phantoms: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["data", "inspect", str(kaggle_phantoms), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "kaggle"
    assert info["counts"]["Training"] == {"glioma": 10, "meningioma": 10, "notumor": 10, "pituitary": 10}
    assert info["total"] == 40
    assert info["problems"] == []


def test_inspect_brats_dataset_and_case(brats_phantoms: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["data", "inspect", str(brats_phantoms), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "brats_dataset"
    assert len(info["cases"]) == 2
    case_dir = sorted(p for p in brats_phantoms.iterdir() if p.is_dir())[0]
    assert main(["data", "inspect", str(case_dir)]) == 0
    text = capsys.readouterr().out
    assert "BraTS case folder" in text and case_dir.name in text and "no problems found" in text


def test_inspect_reports_a_broken_case(brats_phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case_dir = sorted(p for p in brats_phantoms.iterdir() if p.is_dir())[0]
    broken = tmp_path / case_dir.name
    shutil.copytree(case_dir, broken)
    seg_path = next(broken.glob("*_seg.nii.gz"))
    seg = nib.load(str(seg_path))
    data = np.asarray(seg.dataobj).copy()
    data[0, 0, 0] = 3  # not a BraTS label
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), str(seg_path))
    capsys.readouterr()
    assert main(["data", "inspect", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "problem" in out and "3" in out


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p / "missing", "no such"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "neither"),
    ],
    ids=["missing", "file", "empty-folder"],
)
def test_inspect_errors_exit_2(make, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make(tmp_path)
    assert main(["data", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("brainscan: error:") and expected in err and "Traceback" not in err


def test_metrics_segmentation_identity_and_shift(brats_phantoms: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    seg_path = next(sorted(p for p in brats_phantoms.iterdir() if p.is_dir())[0].glob("*_seg.nii.gz"))
    capsys.readouterr()
    assert main(["metrics", "segmentation", "--pred", str(seg_path), "--truth", str(seg_path), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    for region in ("WT", "TC", "ET"):
        assert same[region]["dice"] == pytest.approx(1.0)
        assert same[region]["hd95"] == pytest.approx(0.0)
    img = nib.load(str(seg_path))
    shifted = np.roll(np.asarray(img.dataobj), 3, axis=0)
    shifted_path = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(shifted, img.affine, img.header), str(shifted_path))
    assert main(["metrics", "segmentation", "--pred", str(shifted_path), "--truth", str(seg_path), "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert 0.0 < moved["WT"]["dice"] < 1.0
    assert moved["WT"]["hd95"] > 0.0
    assert main(["metrics", "segmentation", "--pred", str(shifted_path), "--truth", str(seg_path)]) == 0
    assert "WT" in capsys.readouterr().out


def test_metrics_segmentation_refuses_other_grids(brats_phantoms: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    seg_path = next(sorted(p for p in brats_phantoms.iterdir() if p.is_dir())[0].glob("*_seg.nii.gz"))
    img = nib.load(str(seg_path))
    cropped = tmp_path / "cropped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[1:], img.affine), str(cropped))
    assert main(["metrics", "segmentation", "--pred", str(cropped), "--truth", str(seg_path)]) == 2
    assert "shape" in capsys.readouterr().err


@pytest.fixture(scope="module")
def brats2023_case(brats_phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first phantom case in the BraTS 2023-2024 layout: ``<case>-{t1n,t1c,t2w,t2f,seg}``, ET labelled 3."""
    from brainscan.labels import BRATS2023_MODALITIES

    source = sorted(p for p in brats_phantoms.iterdir() if p.is_dir())[0]
    folder = tmp_path_factory.mktemp("brats2023") / "BraTS-GLI-00000-000"
    folder.mkdir()
    for name, modality in BRATS2023_MODALITIES.items():
        shutil.copy(source / f"{source.name}_{modality}.nii.gz", folder / f"{folder.name}-{name}.nii.gz")
    seg = nib.load(str(source / f"{source.name}_seg.nii.gz"))
    labels = np.asarray(seg.dataobj).copy()
    assert (labels == 4).any()
    labels[labels == 4] = 3
    nib.save(nib.Nifti1Image(labels, seg.affine, seg.header), str(folder / f"{folder.name}-seg.nii.gz"))
    return folder


def test_inspect_brats2023_case(brats2023_case: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["data", "inspect", str(brats2023_case), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["layout"], info["label_convention"], info["problems"]) == ("brats_case", "brats2023", [])
    assert info["modalities"]["t1ce"] == "BraTS-GLI-00000-000-t1c.nii.gz"
    assert {k: v["name"] for k, v in info["labels"].items()} == {"0": "background", "1": "NCR", "2": "ED", "3": "ET"}
    assert main(["data", "inspect", str(brats2023_case)]) == 0
    text = capsys.readouterr().out
    assert "case BraTS-GLI-00000-000 (BraTS 2023-2024 naming and labels)" in text
    assert "BraTS-GLI-00000-000-t2f.nii.gz" in text and "no problems found" in text


def test_inspect_reports_a_2021_label_in_a_2023_case(brats2023_case: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / brats2023_case.name
    shutil.copytree(brats2023_case, broken)
    seg_path = broken / f"{broken.name}-seg.nii.gz"
    seg = nib.load(str(seg_path))
    data = np.asarray(seg.dataobj).copy()
    data[0, 0, 0] = 4
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), str(seg_path))
    capsys.readouterr()
    assert main(["data", "inspect", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "[4] outside the BraTS 2023-2024 label set" in out and "[invalid_labels]" in out


def _seg_files(brats_phantoms: Path, brats2023_case: Path) -> dict[str, Path]:
    source = sorted(p for p in brats_phantoms.iterdir() if p.is_dir())[0]
    return {"2021": source / f"{source.name}_seg.nii.gz", "2023": brats2023_case / f"{brats2023_case.name}-seg.nii.gz"}


def test_metrics_segmentation_scores_2023_files_like_2021_ones(brats_phantoms: Path, brats2023_case: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    segs = _seg_files(brats_phantoms, brats2023_case)
    results = {}
    for layout, path in segs.items():
        capsys.readouterr()
        assert main(["metrics", "segmentation", "--pred", str(path), "--truth", str(path), "--json"]) == 0
        results[layout] = json.loads(capsys.readouterr().out)
    assert (results["2021"].pop("label_convention"), results["2023"].pop("label_convention")) == (
        "brats2021", "brats2023")
    assert results["2023"] == results["2021"]
    assert results["2023"]["ET"]["volume_ml"] > 0 and results["2023"]["ET"]["dice"] == pytest.approx(1.0)


@pytest.mark.parametrize("pred, truth, convention, words", [
    ("2021", "2023", "auto", ["prediction", "[4] outside the BraTS 2023-2024"]),
    ("2023", "2023", "brats2021", ["prediction", "[3] outside the BraTS 2018-2021"]),
    ("2023", "2021", "auto", ["prediction", "[3] outside the BraTS 2018-2021"]),
], ids=["2021_pred_2023_truth", "2023_files_forced_2021", "2023_pred_2021_truth"])
def test_metrics_segmentation_refuses_labels_of_the_other_convention(
        pred: str, truth: str, convention: str, words: list[str], brats_phantoms: Path, brats2023_case: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    segs = _seg_files(brats_phantoms, brats2023_case)
    capsys.readouterr()
    assert main(["metrics", "segmentation", "--pred", str(segs[pred]), "--truth", str(segs[truth]),
                 "--label-convention", convention]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_models_list_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--root", str(tmp_path), "list"]) == 0
    assert "no model bundles" in capsys.readouterr().out
    assert main(["models", "--root", str(tmp_path), "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@needs_kaggle
def test_inspect_real_kaggle_training(capsys: pytest.CaptureFixture[str]) -> None:
    # Facts stated in ../shared/data/README.md.
    assert main(["data", "inspect", str(KAGGLE_TRAINING.parent), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["Training"] == {"glioma": 1321, "meningioma": 1339, "notumor": 1595, "pituitary": 1457}
    assert info["total"] == 5712


@needs_brats_sample
def test_inspect_real_brats_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(BRATS_SAMPLE), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "brats_case"
    assert tuple(info["shape"]) == (240, 240, 155)
    assert [round(s, 3) for s in info["spacing_mm"]] == [1.0, 1.0, 1.0]
    truth = np.asarray(nib.load(str(BRATS_SAMPLE / "BraTS2021_00006_seg.nii.gz")).dataobj)
    values, counts = np.unique(truth, return_counts=True)
    assert sorted(int(v) for v in values) == [0, 1, 2, 4]
    reported = {int(k): int(v["voxels"]) for k, v in info["labels"].items()}
    assert reported == {int(v): int(c) for v, c in zip(values, counts)}


def test_progress_written_to_a_log_is_a_few_lines_not_one_per_update(tmp_path: Path, monkeypatch) -> None:
    """A bar on a terminal redraws often; in a log file (evaluate > log 2>&1) it must not flood it."""
    import subprocess
    import sys

    from brainscan.cli.output import LOG_REDRAW_S

    script = ("import sys, time\n"
              "import brainscan.cli.output as output\n"
              "output.LOG_REDRAW_S = float(sys.argv[1])\n"
              "from brainscan.cli.evaluate import _Progress\n"
              "p = _Progress(quiet=False)\n"
              "for case in range(3):\n"
              "    for patch in range(1, 301):\n"
              "        p.cases(case, 3, patch, 300)\n"
              "        time.sleep(0.001)\n"
              "p.close()\n")
    def redraws(redraw_s: str) -> tuple[int, str]:
        log = tmp_path / f"evaluate-{redraw_s}.log"
        with log.open("w") as handle:
            subprocess.run([sys.executable, "-c", script, redraw_s], stderr=handle, check=True, timeout=120)
        text = log.read_text()
        return text.count("\r") + text.count("\n"), text

    count, text = redraws(str(LOG_REDRAW_S))
    assert 0 < count < 10, text[:2000]
    assert "3/3" in text  # the final state is still written when the bar closes
    assert redraws("0.02")[0] > 3 * count  # a terminal's redraw rate would have flooded the log
