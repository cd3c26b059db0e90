"""`brainscan predict segment BUNDLE STUDY --out DIR` on DICOM studies.

Fast tests run the phantom study (conftest.py) through a tiny untrained bundle of the shipped
models' kind (sigmoid WT/TC/ET at 2 mm, LPS): they test the plumbing, not the model. The slow
tests run a real BraTS case acquired as a clinical study (tests/dicom/studies.py: t1ce axial 3 mm,
t1 sagittal 4 mm, t2 axial 5 mm with its own field of view and a patient movement of 4 degrees
and about 4 mm, flair oblique 4 mm), zipped, through the shipped model, and compare its mask
with the NIfTI path's mask of the same case.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from brainscan.cli.main import main
from brainscan.io.nifti import load_nifti
from tests.dicom.studies import (
    CLINICAL_PROTOCOL,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    StudyFiles,
    brats_source,
    write_study,
    zip_folder,
)
from tests.dicom.test_seg import dciodvfy_errors, needs_dciodvfy
from tests.evaluation import make_segmenter_bundle
from tests.paths import BRATS_SAMPLE, REPO_ROOT, needs_brats_sample

SHIPPED_SEGMENTER = REPO_ROOT / "models" / "segmentation" / "unet3d"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_segmenter_bundle(tmp_path_factory.mktemp("store") / "unet3d-test", regions=True)


def _segment(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["predict", "segment", *argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_alignment_choices_match_the_library() -> None:
    from brainscan.cli.predict import ALIGNMENTS
    from brainscan.dicom.registration import METHODS

    assert ALIGNMENTS == METHODS


def test_a_dicom_zip_gives_seg_mask_and_transforms(bundle: Path, phantom_study: StudyFiles, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from brainscan.dicom import identify_series, read_dicom_seg, read_study, series_volume

    archive = zip_folder(phantom_study.folder, tmp_path / "study.zip")
    out = tmp_path / "result"
    code, stdout, _ = _segment([str(bundle), str(archive), "--out", str(out), "--json", "--save-volumes"], capsys)
    assert code == 0
    result = json.loads(stdout)
    assert result["input_kind"] == "dicom" and result["case_id"].startswith("study-")
    assert {m: s["series_instance_uid"] for m, s in result["series"].items()} == phantom_study.series_uids
    assert set(result["alignment"]) == {"t1", "t1ce", "t2", "flair"} and result["alignment"]["t1ce"] == "reference"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["seg.dcm", "mask.nii.gz", "transforms.json", "t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"])

    mask = load_nifti(out / "mask.nii.gz")
    np.testing.assert_allclose(mask.affine, phantom_study.grids["t1ce"], atol=1e-4)
    t1ce = series_volume(identify_series(read_study(phantom_study.folder))["t1ce"])
    assert mask.shape == t1ce.shape and result["shape"] == list(t1ce.shape)
    np.testing.assert_array_equal(read_dicom_seg(out / "seg.dcm", t1ce), mask.data)
    saved = load_nifti(out / "t1ce.nii.gz").data
    np.testing.assert_array_equal(saved[saved != 0], t1ce.data[saved != 0])
    transforms = json.loads((out / "transforms.json").read_text())
    assert [t["modality"] for t in transforms["transforms"]] == ["t1", "t1ce", "t2", "flair"]
    assert transforms["brain_mask"]["fraction"] == 0.2


def test_text_output_and_a_mapping_file(bundle: Path, phantom_study: StudyFiles, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    mapping = tmp_path / "series.json"
    mapping.write_text(json.dumps({phantom_study.series_uids["t1ce"]: "t1ce"}))
    code, stdout, _ = _segment([str(bundle), str(phantom_study.folder), "--out", str(tmp_path / "out"),
                                "--series", str(mapping), "--alignment", "geometry"], capsys)
    assert code == 0
    assert "t1ce      2       AX T1 SE POST GD        " in stdout
    assert "DICOM SEG written to" in stdout and "WT" in stdout


@pytest.mark.parametrize("problem, message", [
    ("nifti_out", "is a DICOM study: --out must be a folder"),
    ("bad_json", "the series mapping is not valid JSON"),
    ("no_flair", "no series looks like flair"),
    ("series_on_nifti", "--series apply to DICOM studies only"),
])
def test_errors_exit_2(problem: str, message: str, bundle: Path, study_copy: StudyFiles, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    study, out, extra = study_copy.folder, tmp_path / "out", []
    if problem == "nifti_out":
        out = tmp_path / "mask.nii.gz"
    elif problem == "bad_json":
        extra = ["--series", "{not json"]
    elif problem == "no_flair":
        shutil.rmtree(study_copy.files["flair"][0].parent)
    else:
        study = tmp_path / "case"
        study.mkdir()
        (study / "case_flair.nii.gz").write_bytes(b"")
        out, extra = tmp_path / "mask.nii.gz", ["--series", "{}"]
    code, _, stderr = _segment([str(bundle), str(study), "--out", str(out), *extra], capsys)
    assert code == 2
    assert message in stderr


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def clinical_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real case as a zipped clinical study, segmented by the DICOM path (CLI) and the NIfTI path."""
    if not (SHIPPED_SEGMENTER / "CURRENT").is_file():
        pytest.skip(f"no shipped segmentation model at {SHIPPED_SEGMENTER}")
    from brainscan.data.brats import find_case, load_case
    from brainscan.inference.segmenter import segment_case
    from brainscan.models.bundle import load_bundle

    root = tmp_path_factory.mktemp("clinical")
    source = brats_source(BRATS_SAMPLE)
    study = write_study(root / "study", source, CLINICAL_PROTOCOL)
    archive = zip_folder(study.folder, root / "study.zip")
    out = root / "result"
    records = _Records()
    records.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger()
    previous = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        import contextlib
        import io

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(["predict", "segment", "unet3d", str(archive), "--out", str(out), "--json", "--quiet",
                         "--models-root", str(REPO_ROOT / "models")])
    finally:
        logger.removeHandler(records)
        logger.setLevel(previous)
    assert code == 0
    bundle = load_bundle(SHIPPED_SEGMENTER / (SHIPPED_SEGMENTER / "CURRENT").read_text().strip())
    loaded = load_case(find_case(BRATS_SAMPLE), with_seg=True)
    return {"study": study, "source": source, "out": out, "result": json.loads(stdout.getvalue()),
            "stdout": stdout.getvalue(), "logs": "\n".join(records.lines),
            "nifti_mask": segment_case(bundle, loaded), "nifti_affine": loaded.reference.affine}


@pytest.mark.slow
@needs_brats_sample
def test_dicom_path_agrees_with_the_nifti_path(clinical_run: dict) -> None:
    mask = load_nifti(clinical_run["out"] / "mask.nii.gz")
    to_nifti_voxels = np.linalg.inv(clinical_run["nifti_affine"]) @ mask.affine
    grid = np.indices(mask.shape).reshape(3, -1).astype(np.float64)
    points = to_nifti_voxels[:3, :3] @ grid + to_nifti_voxels[:3, 3:4]
    nifti_on_t1ce = ndi.map_coordinates(clinical_run["nifti_mask"], points, order=0).reshape(mask.shape)
    dice = {"WT": _dice(mask.data > 0, nifti_on_t1ce > 0),
            "TC": _dice(np.isin(mask.data, (1, 4)), np.isin(nifti_on_t1ce, (1, 4))),
            "ET": _dice(mask.data == 4, nifti_on_t1ce == 4)}
    print(f"Dice of the DICOM path's mask against the NIfTI path's (t1ce grid): {dice}")
    assert dice["WT"] >= 0.90, dice


@pytest.mark.slow
@needs_brats_sample
def test_clinical_study_outputs_are_on_the_t1ce_grid_and_valid(clinical_run: dict) -> None:
    from brainscan.dicom import identify_series, read_dicom_seg, read_study, series_volume

    study: StudyFiles = clinical_run["study"]
    mask = load_nifti(clinical_run["out"] / "mask.nii.gz")
    np.testing.assert_allclose(mask.affine, study.grids["t1ce"], atol=1e-4)
    t1ce = series_volume(identify_series(read_study(study.folder))["t1ce"])
    assert mask.shape == t1ce.shape == (256, 256, 52)
    np.testing.assert_array_equal(read_dicom_seg(clinical_run["out"] / "seg.dcm", t1ce), mask.data)
    assert {m: s["series_instance_uid"] for m, s in clinical_run["result"]["series"].items()} == study.series_uids


@pytest.mark.slow
@needs_brats_sample
def test_the_patient_movement_before_t2_was_registered(clinical_run: dict) -> None:
    written = json.loads((clinical_run["out"] / "transforms.json").read_text())
    transforms = {t["modality"]: t for t in written["transforms"]}
    moved = transforms["t2"]["registration"]
    assert transforms["t2"]["method"] == "rigid" and moved["accepted"]
    assert moved["correction_rotation_deg"] == pytest.approx(4.0, abs=1.0)
    for modality in ("t1", "flair"):
        assert transforms[modality]["registration"]["correction_translation_mm"] < 2.0


@pytest.mark.slow
@needs_brats_sample
def test_no_patient_data_in_logs_or_output(clinical_run: dict) -> None:
    assert "series identified" in clinical_run["logs"]
    for phi in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, PATIENT_BIRTH_DATE):
        assert phi not in clinical_run["logs"]
        assert phi not in clinical_run["stdout"]


@pytest.mark.slow
@needs_dciodvfy
@needs_brats_sample
def test_clinical_seg_passes_dciodvfy(clinical_run: dict) -> None:
    assert dciodvfy_errors(clinical_run["out"] / "seg.dcm") == []
