"""Rigid registration to t1ce undoes a known patient movement, refuses implausible results, and records it all.

The source is a synthetic phantom at 2.5 mm (its anatomy is the MNI template): t1ce is acquired
axially at 2 mm x 3 mm; t2 is acquired after the patient turned 5 degrees and moved a few
millimetres, which registration should find, within a millimetre or so at the brain's corners.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from brainscan.dicom import registration
from brainscan.dicom.registration import from_sitk, no_finer, register_rigid, to_sitk
from brainscan.dicom.volume import LPS_TO_RAS
from tests.dicom.studies import CLINICAL_PROTOCOL, SourceCase, acquire, motion_matrix, phantom_source

MOTION = (5.0, (4.0, -3.0, 2.0))


@pytest.fixture(scope="module")
def source() -> SourceCase:
    return phantom_source((96, 96, 64), seed=4)


def _pair(source: SourceCase, motion: tuple | None) -> tuple:
    t1ce = replace(CLINICAL_PROTOCOL[0], pixel_mm=2.0, matrix=(112, 112), slices=50)
    t2 = replace(CLINICAL_PROTOCOL[2], pixel_mm=2.0, slice_mm=4.0, matrix=(104, 112), slices=40, motion=motion)
    return acquire(source, t1ce, thickness_samples=3), acquire(source, t2, thickness_samples=3)


def _brain_corners(source: SourceCase) -> np.ndarray:
    nonzero = np.argwhere(source.volumes["t1ce"] > 0)
    low, high = nonzero.min(axis=0), nonzero.max(axis=0)
    corners = np.array([[x, y, z, 1.0]
                        for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    return (LPS_TO_RAS @ source.affine @ corners.T).T


def test_registration_copies_are_no_finer_than_the_registration_spacing() -> None:
    """Fine axes are resampled to 2 mm, thick slices keep their spacing; the copy covers the same box."""
    affine = LPS_TO_RAS @ np.array([[0, 0, -4.0, 90], [0.9, 0, 0, -100], [0, -0.9, 0, 80], [0, 0, 0, 1]])
    image = to_sitk(np.ones((200, 180, 20), dtype=np.float32), affine)  # 0.9 x 0.9 x 4 mm
    copy = no_finer(image, 2.0)
    assert copy.GetSpacing() == pytest.approx((2.0, 2.0, 4.0))
    assert copy.GetSize() == (90, 81, 20)
    assert copy.GetDirection() == pytest.approx(image.GetDirection()) and copy.GetOrigin() == image.GetOrigin()
    coarse = to_sitk(np.ones((30, 30, 20), dtype=np.float32), np.diag([3.6, 3.6, 5.0, 1.0]))
    assert no_finer(coarse, 2.0).GetSize() == (30, 30, 20)  # nothing finer than 2 mm: as it was


def test_to_sitk_keeps_the_geometry() -> None:
    affine = LPS_TO_RAS @ np.array([[0, 0, -4.0, 90], [0.9, 0, 0, -100], [0, -0.9, 0, 80], [0, 0, 0, 1]])
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    image = to_sitk(data, affine)
    lps = LPS_TO_RAS @ affine
    for index in ((0, 0, 0), (4, 5, 6), (1, 2, 3)):
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), (lps @ [*index, 1])[:3], atol=1e-6)
        assert image[index] == data[index]
    np.testing.assert_array_equal(from_sitk(image), data)


def test_registration_undoes_a_known_movement(source: SourceCase) -> None:
    (fixed_data, fixed_affine), (moving_data, moving_affine) = _pair(source, MOTION)
    transform, record = register_rigid(to_sitk(fixed_data, fixed_affine), to_sitk(moving_data, moving_affine))
    assert record["method"] == "rigid" and record["registration"]["accepted"]
    assert record["registration"]["metric_after"] < record["registration"]["metric_before"]
    # The t2 shows at p the anatomy that t1ce shows at motion(p): registration must find motion^-1.
    expected = np.linalg.inv(motion_matrix(MOTION, source.brain_centre_lps()))
    found = np.asarray(record["matrix_lps"])
    corners = _brain_corners(source)
    error = np.linalg.norm((corners @ found.T - corners @ expected.T)[:, :3], axis=1)
    assert error.max() < 2.0, f"registration error at the brain's corners up to {error.max():.2f} mm"
    assert record["registration"]["correction_rotation_deg"] == pytest.approx(MOTION[0], abs=1.0)


def test_an_implausible_correction_is_refused(source: SourceCase, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond what patient motion explains (here: a bound lowered below the true movement), the
    geometry is kept and the record says why."""
    monkeypatch.setattr(registration, "MAX_TRANSLATION_MM", 1.0)
    (fixed_data, fixed_affine), (moving_data, moving_affine) = _pair(source, MOTION)
    _, record = register_rigid(to_sitk(fixed_data, fixed_affine), to_sitk(moving_data, moving_affine))
    assert record["method"] == "geometry"
    assert not record["registration"]["accepted"]
    assert "beyond the 15.0 deg / 1.0 mm that patient motion explains" in record["registration"]["rejected_because"]
    np.testing.assert_allclose(record["matrix_lps"], np.eye(4), atol=1e-9)
