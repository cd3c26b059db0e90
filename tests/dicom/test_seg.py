"""The DICOM SEG: valid for a DICOM validator, decodes to the same labels, references the t1ce series,
carries the source's patient and study, and describes each label with standard codes as AUTOMATIC.

The t1ce series is the phantom study's (see conftest.py); the mask is a made-up tumour on its grid.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from brainscan import __version__
from brainscan.dicom import algorithm_identification, identify_series, read_dicom_seg, read_study, series_volume
from brainscan.dicom.volume import SeriesVolume
from brainscan.dicom.seg import write_dicom_seg
from brainscan.errors import BadDimensionsError, InvalidLabelsError
from tests.dicom.studies import PATIENT_ID, PATIENT_NAME, StudyFiles

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed; "
                                                             "make system-deps installs it")


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy``'s report that are errors (warnings are not)."""
    report = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def t1ce(phantom_study: StudyFiles) -> SeriesVolume:
    return series_volume(identify_series(read_study(phantom_study.folder))["t1ce"])


def _tumour(shape: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    x, y, z = (s // 2 for s in shape)
    mask[x - 8:x + 8, y - 8:y + 8, z - 4:z + 4] = 2
    mask[x - 4:x + 4, y - 4:y + 4, z - 2:z + 2] = 4
    mask[x - 2:x + 2, y - 2:y + 2, z - 1:z + 1] = 1
    return mask


ALGORITHM = dict(name="unet3d-1", version="1", parameters={"overlap": 0.5})


@pytest.mark.parametrize("empty", [False, True], ids=["tumour", "no tumour"])
def test_seg_reads_back_to_the_same_labels(t1ce: SeriesVolume, tmp_path: Path, empty: bool) -> None:
    mask = np.zeros(t1ce.shape, np.uint8) if empty else _tumour(t1ce.shape)
    path = write_dicom_seg(mask, t1ce, tmp_path / "seg.dcm", algorithm=algorithm_identification(**ALGORITHM))
    np.testing.assert_array_equal(read_dicom_seg(path, t1ce), mask)


@needs_dciodvfy
@pytest.mark.parametrize("empty", [False, True], ids=["tumour", "no tumour"])
def test_seg_passes_dciodvfy(t1ce: SeriesVolume, tmp_path: Path, empty: bool) -> None:
    mask = np.zeros(t1ce.shape, np.uint8) if empty else _tumour(t1ce.shape)
    path = write_dicom_seg(mask, t1ce, tmp_path / "seg.dcm", algorithm=algorithm_identification(**ALGORITHM))
    assert dciodvfy_errors(path) == []


def test_seg_references_the_t1ce_series_and_copies_patient_and_study(t1ce: SeriesVolume, phantom_study: StudyFiles,
                                                                     tmp_path: Path) -> None:
    path = write_dicom_seg(_tumour(t1ce.shape), t1ce, tmp_path / "seg.dcm",
                           algorithm=algorithm_identification(**ALGORITHM))
    seg = pydicom.dcmread(path)
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == phantom_study.series_uids["t1ce"]
    t1ce_instances = {str(h.SOPInstanceUID) for h in t1ce.instances}
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} <= t1ce_instances
    assert seg.StudyInstanceUID == phantom_study.study.study_uid
    assert seg.FrameOfReferenceUID == phantom_study.study.frame_uid
    assert (str(seg.PatientName), seg.PatientID) == (PATIENT_NAME, PATIENT_ID)
    assert seg.SeriesInstanceUID != phantom_study.series_uids["t1ce"]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"


def test_segments_have_standard_codes_and_brainscan_as_automatic_algorithm(t1ce: SeriesVolume, tmp_path: Path) -> None:
    path = write_dicom_seg(_tumour(t1ce.shape), t1ce, tmp_path / "seg.dcm",
                           algorithm=algorithm_identification(**ALGORITHM))
    segments = pydicom.dcmread(path).SegmentSequence
    found = {s.SegmentLabel: (s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                              s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) for s in segments}
    assert found == {"NCR": ("6574001", "SCT"), "ED": ("79654002", "SCT"), "ET": ("C113842", "NCIt")}
    for segment in segments:
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == "brainscan"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "brainscan"
        assert algorithm.AlgorithmVersion == f"{__version__} (unet3d-1 1)"
        assert "model=unet3d-1" in algorithm.AlgorithmParameters and "overlap=0.5" in algorithm.AlgorithmParameters


def test_seg_refuses_a_mask_off_the_grid_or_with_other_labels(t1ce: SeriesVolume, tmp_path: Path) -> None:
    algorithm = algorithm_identification(**ALGORITHM)
    with pytest.raises(BadDimensionsError, match="is not the reference series' grid"):
        write_dicom_seg(np.zeros((4, 4, 4), np.uint8), t1ce, tmp_path / "seg.dcm", algorithm=algorithm)
    with pytest.raises(InvalidLabelsError):
        write_dicom_seg(np.full(t1ce.shape, 3, np.uint8), t1ce, tmp_path / "seg.dcm", algorithm=algorithm)
