"""Reconstruction geometry: a known volume written as DICOM slices comes back with the same voxels and affine.

Each case stands for a series acquired in one plane (axial, sagittal, coronal, oblique), with
anisotropic pixels, written one slice per file under names that do not follow slice order. The
result is also checked against an independent reader, SimpleITK's GDCM series reader.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainscan.dicom import read_study, series_volume
from brainscan.dicom.volume import LPS_TO_RAS
from tests.dicom.studies import new_study, uid, volume_instances, write_instances


def _rotation(x_deg: float, y_deg: float, z_deg: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [x_deg, y_deg, z_deg], degrees=True).as_matrix()


_PLANES = {  # LPS direction of columns (i), rows (j) and slices (k) of each plane
    "axial": np.eye(3),
    "sagittal": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float),
    "coronal": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float),
}


def _affine(plane: str, tilt: tuple[float, float, float], spacing: tuple[float, float, float],
            origin_lps: tuple[float, float, float]) -> np.ndarray:
    """RAS affine of a grid whose voxel axes run along ``plane``'s directions turned by ``tilt``."""
    lps = np.eye(4)
    lps[:3, :3] = _rotation(*tilt) @ _PLANES[plane] @ np.diag(spacing)
    lps[:3, 3] = origin_lps
    return LPS_TO_RAS @ lps


def _write(folder: Path, data: np.ndarray, affine: np.ndarray) -> str:
    study = new_study(folder.name)
    series_uid = uid(folder.name, "series")
    write_instances(volume_instances(data, affine, study=study, series_uid=series_uid, series_number=7,
                                     description="AX T1"), folder / "DICOM")
    return series_uid


CASES = [
    ("axial", (0, 0, 0), (0.9, 0.9, 3.0), "LPS"),
    ("sagittal", (0, 0, 0), (0.9, 0.8, 4.0), "PIR"),
    ("coronal", (0, 0, 0), (0.7, 1.1, 5.0), "LIP"),
    ("axial", (14.0, -6.0, 3.0), (0.9, 0.9, 5.0), "LPS"),
]


@pytest.mark.parametrize("plane, tilt, spacing, codes", CASES, ids=["axial", "sagittal", "coronal", "oblique"])
def test_a_known_volume_round_trips(plane: str, tilt: tuple, spacing: tuple, codes: str, tmp_path: Path) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(5)
    data = rng.integers(0, 4000, size=(20, 24, 12)).astype(np.float32)
    affine = _affine(plane, tilt, spacing, (-80.5, 35.0, -12.25))
    series_uid = _write(tmp_path, data, affine)

    volume = series_volume(read_study(tmp_path).series[series_uid])
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_allclose(volume.spacing, spacing, rtol=1e-5)
    if not any(tilt):
        assert "".join(nib.aff2axcodes(volume.affine)) == codes

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "DICOM"), series_uid))
    image = reader.Execute()
    lps = LPS_TO_RAS @ volume.affine
    for index in ((0, 0, 0), (19, 0, 0), (0, 23, 0), (3, 5, 11)):
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), (lps @ [*index, 1])[:3], atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), data)


def test_slices_stored_against_the_normal_come_back_in_normal_order(tmp_path: Path) -> None:
    """A series whose slice positions decrease along the normal (feet first, say) is reordered;
    every voxel keeps its place in the world."""
    data = np.random.default_rng(6).integers(0, 4000, size=(16, 18, 10)).astype(np.float32)
    affine = _affine("axial", (0, 0, 0), (0.9, 0.9, 3.0), (10.0, -20.0, 60.0))
    flipped = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]], dtype=float)
    series_uid = _write(tmp_path, data, flipped)
    volume = series_volume(read_study(tmp_path).series[series_uid])
    np.testing.assert_array_equal(volume.data, data[:, :, ::-1])
    np.testing.assert_allclose(volume.affine @ [0, 0, 9, 1], flipped @ [0, 0, 0, 1], atol=1e-4)
    assert volume.affine[2, 2] > 0


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    data = np.random.default_rng(7).integers(0, 4000, size=(12, 12, 5)).astype(np.float32) * 2
    affine = _affine("axial", (0, 0, 0), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0))
    study = new_study("rescaled")
    instances = volume_instances(data, affine, study=study, series_uid=uid("rescaled"), series_number=3,
                                 description="AX T2", rescale_slope=2.0)
    for ds in instances:
        ds.RescaleIntercept = "-10"
    write_instances(instances, tmp_path)
    volume = series_volume(read_study(tmp_path).series[uid("rescaled")])
    np.testing.assert_array_equal(volume.data, data - 10)
