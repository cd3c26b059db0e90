"""NIfTI uploads whose modalities are not on one grid: aligned to t1ce, as DICOM studies are.

What each fixture stands for:

- ``clinical``: the real BraTS2021_00006 case as a scanner's NIfTI converter would give it, each
  series on its own clinical-like grid: t1ce kept as it is (the reference grid, 1 mm), t1 sagittal
  1 x 1 x 4 mm, t2 axial 1 x 1 x 4 mm with its own field of view after the patient turned 4 degrees
  and moved ~4 mm (a movement registration must undo), flair oblique (tilted 10 degrees) 1.2 x 1.2 x
  4 mm. Sampled from the co-registered BraTS volumes by tests/dicom/studies.py's ``acquire`` (trilinear,
  averaged across the slice thickness), written as .nii.gz with their own affines.
- ``coarse``: the same case acquired with the DICOM tests' small clinical protocol (t1ce axial,
  t1 sagittal, t2 with its own field of view and movement, flair oblique; 3.6 mm pixels, 5 mm
  slices) as four .nii.gz files: small enough for a real segmenter stack (Redis, API, Celery
  worker, tiny seeded U-Net) to segment in seconds.

Registration runs at 2 mm (the default of :func:`brainscan.preprocess.align.align_nifti_case`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from brainscan.errors import VolumeMismatchError
from brainscan.io.nifti import load_nifti
from brainscan.labels import MODALITIES
from brainscan.preprocess.align import align_nifti_case, check_overlap, save_aligned_results
from services.segmenter.intake import IntakeLimits, UploadPart, accept_upload
from tests.dicom.studies import (
    Acquisition,
    SourceCase,
    acquire,
    brats_source,
    motion_matrix,
    small_protocol,
)
from tests.paths import BRATS_SAMPLE, needs_brats_sample
from tests.redis_server import needs_redis
from tests.segmenter import brats_zip, case_files, nifti_bytes

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), needs_brats_sample]

MOTION = (4.0, (3.0, -2.0, 2.5))
#: t1, t2 and flair as a clinical protocol acquires them (t1ce stays on the BraTS 1 mm grid)
CLINICAL = {
    "t1": Acquisition("t1", "SAG T1", "sagittal", pixel_mm=1.0, slice_mm=4.0, matrix=(224, 200), slices=42),
    "t2": Acquisition("t2", "AX T2", "axial", pixel_mm=1.0, slice_mm=4.0, matrix=(200, 220), slices=36,
                      offset_mm=(5.0, -8.0, 6.0), motion=MOTION),
    "flair": Acquisition("flair", "OBL FLAIR", "axial", tilt_deg=10.0, pixel_mm=1.2, slice_mm=4.0,
                         matrix=(180, 180), slices=38),
}
LIMITS = IntakeLimits(max_upload_bytes=64 << 20, max_voxels=2**24)


@pytest.fixture(scope="module")
def source() -> SourceCase:
    return brats_source(BRATS_SAMPLE)


def _write(folder: Path, data: np.ndarray, affine: np.ndarray, name: str) -> Path:
    path = folder / f"{name}.nii.gz"
    path.write_bytes(nifti_bytes(data.astype(np.float32), affine))
    return path


@pytest.fixture(scope="module")
def clinical(source: SourceCase, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clinical-nifti")
    files = {"t1ce": BRATS_SAMPLE / f"{BRATS_SAMPLE.name}_t1ce.nii.gz"}
    for modality, acquisition in CLINICAL.items():
        files[modality] = _write(folder, *acquire(source, acquisition, thickness_samples=3), f"case_{modality}")
    return files


@pytest.fixture(scope="module")
def coarse(source: SourceCase, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("coarse-nifti")
    return {a.modality: _write(folder, *acquire(source, a, thickness_samples=3), f"BraTS2021_00006_{a.modality}")
            for a in small_protocol()}


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_the_core_puts_clinical_grids_back_on_the_t1ce_grid(source: SourceCase, clinical: dict[str, Path],
                                                            tmp_path: Path) -> None:
    volumes = {m: load_nifti(path) for m, path in clinical.items()}
    assert len({v.shape for v in volumes.values()}) == 4  # four grids
    case = align_nifti_case(volumes)
    t1ce = volumes["t1ce"]
    assert case.channels.shape == (4, *t1ce.shape) and case.reference.shape == t1ce.shape
    np.testing.assert_allclose(case.reference.affine, t1ce.affine)
    brain = np.all(case.channels != 0, axis=0)
    assert brain.sum() > 0.5 * np.count_nonzero(source.volumes["t1ce"])
    geometry = align_nifti_case(volumes, method="geometry", skull_strip="off")  # the affines alone
    for index, modality in enumerate(MODALITIES):
        aligned = _correlation(case.channels[index][brain], source.volumes[modality][brain])
        assert aligned > 0.85, f"{modality}: correlation {aligned:.3f} with the BraTS original"
        if modality == "t2":  # the patient moved: only registration brings it back
            unaligned = _correlation(geometry.channels[index][brain], source.volumes[modality][brain])
            assert aligned > unaligned + 0.2, (aligned, unaligned)
    records = {r["modality"]: r for r in case.transforms}
    assert records["t1ce"]["method"] == "reference" and records["t1ce"]["file"] == "t1ce"
    assert all(records[m]["method"] == "rigid" and records[m]["registration"]["spacing_mm"] == 2.0
               for m in CLINICAL)
    # registered on copies no finer than 2 mm, the thick slices at their own thickness
    assert all(min(records[m]["registration"]["grid_mm"][side]) >= 2.0
               for m in CLINICAL for side in ("reference", "moving"))
    # t2 shows at p the anatomy t1ce shows at motion(p): the transform found must be motion^-1
    expected = np.linalg.inv(motion_matrix(MOTION, source.brain_centre_lps()))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    corners = np.array([[x, y, z, 1.0] for x in (60, 180) for y in (50, 190) for z in (20, 130)])
    corners = (lps @ t1ce.affine @ corners.T).T
    error = np.linalg.norm((corners @ np.asarray(records["t2"]["matrix_lps"]).T - corners @ expected.T)[:, :3], axis=1)
    assert error.max() < 2.5, f"t2 registration error up to {error.max():.2f} mm at the brain's corners"
    for modality in ("t1", "flair"):  # no movement: a correction of at most a voxel or so
        assert records[modality]["registration"]["correction_translation_mm"] < 2.0
    assert case.skull_strip["decision"].startswith("already skull-stripped")
    written = save_aligned_results(case, (case.channels[1] > 0).astype(np.uint8), tmp_path)
    mask = load_nifti(written["mask"])
    assert mask.shape == t1ce.shape
    np.testing.assert_allclose(mask.affine, t1ce.affine, atol=1e-5)


def _parts(files: dict[str, Path]) -> list[UploadPart]:
    return [UploadPart(m, path.name, io.BytesIO(path.read_bytes())) for m, path in files.items()]


def test_intake_accepts_other_grids_and_records_the_alignment(coarse: dict[str, Path], tmp_path: Path) -> None:
    t1ce = load_nifti(coarse["t1ce"])
    zipped = brats_zip({m: path.read_bytes() for m, path in coarse.items()}, case_id="BraTS2021_00006",
                       folder="BraTS2021_00006/")
    for label, parts in (("files", _parts(coarse)), ("zip", [UploadPart("case", "case.zip", io.BytesIO(zipped))])):
        staging = tmp_path / label
        staging.mkdir()
        meta = accept_upload(parts, staging, LIMITS).meta
        assert meta["source"] == label
        assert meta["alignment"]["needed"] and meta["alignment"]["reference"] == "t1ce"
        assert meta["shape"] == list(t1ce.shape)  # the mask's grid
        assert {m: g["shape"] for m, g in meta["alignment"]["grids"].items()} == \
            {m: list(load_nifti(p).shape) for m, p in coarse.items()}
        assert min(meta["alignment"]["overlap"].values()) > 0.5
    staging = tmp_path / "one-grid"
    staging.mkdir()
    one_grid = [UploadPart(m, f"{m}.nii.gz", io.BytesIO(raw)) for m, raw in case_files().items()]
    same = accept_upload(one_grid, staging, LIMITS)
    assert "alignment" not in same.meta  # one grid: today's path, untouched


def test_check_overlap_refuses_volumes_that_lie_apart(coarse: dict[str, Path]) -> None:
    grids = {m: (load_nifti(p).shape, load_nifti(p).affine) for m, p in coarse.items()}
    far = grids["flair"][1].copy()
    far[:3, 3] += (0.0, 0.0, 250.0)  # 25 cm above the head
    with pytest.raises(VolumeMismatchError) as caught:
        check_overlap({**grids, "flair": (grids["flair"][0], far)}, {"flair": "flair.nii.gz"})
    assert (caught.value.http_status, caught.value.code) == (422, "no_overlap")
    assert "flair (flair.nii.gz) covers 0%" in caught.value.message


# -- through a real segmenter: Redis, API, Celery worker, tiny seeded U-Net ---------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.gateway.test_segmentations import segmentation_stack

    with segmentation_stack(tmp_path_factory.mktemp("nifti-alignment")) as running:
        yield running


@pytest.fixture
def client(stack) -> Iterator[httpx.Client]:
    from gateway.ownership import OWNER_HEADER
    from tests.servers import INTERNAL_HEADERS

    with httpx.Client(base_url=stack.url, timeout=60, trust_env=False,
                      headers={OWNER_HEADER: "session:nifti-alignment", **INTERNAL_HEADERS}) as session:
        yield session


def _jobs(stack) -> list[str]:
    return sorted(p.name for p in stack.jobs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if stack.jobs_dir.is_dir() else []


def _upload(files: dict[str, Path]) -> dict[str, tuple[str, bytes, str]]:
    return {m: (path.name, path.read_bytes(), "application/gzip") for m, path in files.items()}


@needs_redis
def test_an_upload_on_four_grids_gives_a_mask_on_the_t1ce_grid(stack, client, coarse: dict[str, Path]) -> None:
    from tests.gateway.test_segmentations import nifti_from_bytes, wait_for_job

    created = client.post("/v1/jobs", files=_upload(coarse))
    assert created.status_code == 202, created.text
    assert created.json()["input"]["alignment"]["needed"]
    job = wait_for_job(client, created.headers["location"], stack, timeout_s=240)
    assert job["status"] == "succeeded", f"{job}\n{stack.worker_log_tail()}"
    t1ce = load_nifti(coarse["t1ce"])
    mask = nifti_from_bytes(client.get(job["result"]["mask_url"]).content)
    assert mask.shape == t1ce.shape and job["input"]["shape"] == list(t1ce.shape)
    np.testing.assert_allclose(mask.affine, t1ce.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 4}
    assert set(job["result"]["files"]) == {"mask.nii.gz", "transforms.json"}
    transforms = client.get(job["result"]["transforms_url"])
    assert transforms.status_code == 200
    record = transforms.json()
    assert record["reference"] == "t1ce" and record["skull_strip"]["mode"] == "auto"
    methods = {t["modality"]: t["method"] for t in record["transforms"]}
    assert methods["t1ce"] == "reference" and {methods[m] for m in ("t1", "t2", "flair")} <= {"rigid", "geometry"}
    assert record["inputs"]["t1"]["shape"] == list(load_nifti(coarse["t1"]).shape)
    flair = nifti_from_bytes(client.get(job["links"]["inputs"]["flair"]).content)
    assert flair.shape == load_nifti(coarse["flair"]).shape  # the inputs stay as uploaded


@needs_redis
def test_volumes_that_do_not_overlap_are_422_and_queue_nothing(stack, client, coarse: dict[str, Path]) -> None:
    flair = load_nifti(coarse["flair"])
    far = flair.affine.copy()
    far[:3, 3] += (300.0, 0.0, 0.0)
    files = {**_upload(coarse), "flair": ("flair.nii.gz", nifti_bytes(flair.data, far), "application/gzip")}
    before = _jobs(stack)
    answer = client.post("/v1/jobs", files=files)
    body = answer.json()
    assert answer.status_code == 422 and body["error"] == "no_overlap", body
    assert "flair" in body["detail"] and "t1ce" in body["detail"]
    assert _jobs(stack) == before
