"""Tests of brainscan.data.brats on tiny synthetic cases written with the real BraTS naming schemes
(2018-2021 ``<case>_t1ce`` with labels {0, 1, 2, 4}, and 2023-2024 ``<case>-t1c`` with {0, 1, 2, 3})."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainscan.data.brats import (
    find_case,
    find_cases,
    load_case,
    scan_dataset,
)
from brainscan.data.brats_inspect import inspect_case, inspect_dataset
from brainscan.errors import (
    BadDimensionsError,
    CorruptFileError,
    DatasetLayoutError,
    InvalidLabelsError,
    MissingModalityError,
    NonFiniteError,
    VolumeMismatchError,
)
from brainscan.io.nifti import save_nifti
from brainscan.labels import BRATS2021, BRATS2023, BRATS2023_MODALITIES, MODALITIES
from tests.paths import BRATS_SAMPLE, needs_brats_sample

SHAPE = (12, 10, 8)
# BraTS volumes are stored with an LPS-like affine; anisotropic spacing makes spacing bugs visible.
AFFINE = np.array([[-1.0, 0, 0, 11], [0, -1.2, 0, 9], [0, 0, 2.0, -3], [0, 0, 0, 1]])


def _brain(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1)[:, None, None, None] / 2
    radius = (np.array(shape) / 2.5)[:, None, None, None]
    return (((grid - centre) / radius) ** 2).sum(axis=0) <= 1


def _modality_data(index: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Distinct int16 intensities per modality (so a channel swap is caught), 0 outside the brain."""
    rng = np.random.default_rng(index)
    return np.where(_brain(shape), rng.integers(100 * (index + 1), 100 * (index + 2), shape), 0).astype(np.int16)


def _seg_data(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[4:7, 4:6, 3:5] = 2
    seg[5:6, 4:6, 3:5] = 1
    seg[6, 5, 4] = 4
    return seg


def write_case(
    folder: Path,
    case_id: str,
    *,
    ext: str = ".nii.gz",
    seg: bool = True,
    seg_name: str | None = None,
    skip: tuple[str, ...] = (),
    suffix_case=str.lower,
) -> dict[str, np.ndarray]:
    """Write a synthetic case as ``<case_id>_<modality><ext>``; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for index, modality in enumerate(MODALITIES):
        if modality in skip:
            continue
        written[modality] = _modality_data(index)
        save_nifti(written[modality], folder / f"{case_id}_{suffix_case(modality)}{ext}", affine=AFFINE)
    if seg:
        written["seg"] = _seg_data()
        save_nifti(written["seg"], folder / (seg_name or f"{case_id}_{suffix_case('seg')}{ext}"), affine=AFFINE)
    return written


# --------------------------------------------------------------------------------------------- naming

NAMING = [
    # (case_id, extension, with seg, seg file name override)
    ("Brats18_2013_2_1", ".nii.gz", True, None),
    ("Brats18_CBICA_AAB_1", ".nii.gz", True, None),
    ("BraTS20_Training_001", ".nii", True, None),
    ("BraTS20_Validation_001", ".nii", False, None),
    ("BraTS20_Training_355", ".nii", True, "W39_1998.09.19_Segm.nii"),
    ("BraTS20_Training_355", ".nii.gz", True, "W39_1998.09.19_Segm.nii.gz"),
    ("BraTS2021_00006", ".nii.gz", True, None),
    ("BraTS2021_01666", ".nii", True, None),
]


@pytest.mark.parametrize(("case_id", "ext", "with_seg", "seg_name"), NAMING)
def test_find_case_recognises_brats_naming(tmp_path: Path, case_id: str, ext: str, with_seg: bool, seg_name) -> None:
    folder = tmp_path / case_id
    write_case(folder, case_id, ext=ext, seg=with_seg, seg_name=seg_name)
    case = find_case(folder)
    assert case.case_id == case_id
    assert case.folder == folder
    assert list(case.modalities) == list(MODALITIES)
    for modality, path in case.modalities.items():
        assert path.name == f"{case_id}_{modality}{ext}"  # t1 and t1ce never swapped
    expected_seg = (seg_name or f"{case_id}_seg{ext}") if with_seg else None
    assert (case.seg.name if case.seg else None) == expected_seg


@pytest.mark.parametrize("suffix_case", [str.upper, str.capitalize])
def test_find_case_suffixes_are_case_insensitive(tmp_path: Path, suffix_case) -> None:
    write_case(tmp_path / "c", "BraTS20_Training_002", suffix_case=suffix_case)
    case = find_case(tmp_path / "c")
    assert case.modalities["t1"].name == f"BraTS20_Training_002_{suffix_case('t1')}.nii.gz"
    assert case.modalities["t1ce"].name == f"BraTS20_Training_002_{suffix_case('t1ce')}.nii.gz"
    assert case.seg is not None


def test_find_case_ignores_clutter_and_prefers_seg_over_segm(tmp_path: Path) -> None:
    folder = tmp_path / "BraTS20_Training_355"
    write_case(folder, "BraTS20_Training_355", ext=".nii")
    save_nifti(_seg_data(), folder / "W39_1998.09.19_Segm.nii", affine=AFFINE)
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "._BraTS20_Training_355_t1.nii").write_bytes(b"\0" * 10)  # macOS resource fork
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    case = find_case(folder)
    assert case.seg is not None and case.seg.name == "BraTS20_Training_355_seg.nii"
    assert case.modalities["t1"].name == "BraTS20_Training_355_t1.nii"


def test_find_case_mixed_extensions(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    write_case(folder, "BraTS20_Training_003", ext=".nii", skip=("flair",))
    save_nifti(_modality_data(3), folder / "BraTS20_Training_003_flair.nii.gz", affine=AFFINE)
    assert find_case(folder).modalities["flair"].name == "BraTS20_Training_003_flair.nii.gz"


def _missing_t1ce(folder: Path) -> None:
    write_case(folder, "BraTS2021_00001", skip=("t1ce",))


def _missing_t1(folder: Path) -> None:
    write_case(folder, "BraTS2021_00001", skip=("t1",))


def _duplicate_flair(folder: Path) -> None:
    write_case(folder, "BraTS2021_00001")
    save_nifti(_modality_data(3), folder / "BraTS2021_00001_flair.nii", affine=AFFINE)


def _duplicate_seg(folder: Path) -> None:
    write_case(folder, "BraTS2021_00001")
    save_nifti(_seg_data(), folder / "BraTS2021_00001_seg.nii", affine=AFFINE)


def _two_segm_files(folder: Path) -> None:
    write_case(folder, "BraTS20_Training_355", seg_name="W39_1998.09.19_Segm.nii")
    save_nifti(_seg_data(), folder / "W40_2001.01.01_Segm.nii", affine=AFFINE)


def _two_cases_in_one_folder(folder: Path) -> None:
    write_case(folder, "BraTS2021_00001", skip=("t2",))
    save_nifti(_modality_data(2), folder / "BraTS2021_00002_t2.nii.gz", affine=AFFINE)


def _seg_of_other_case(folder: Path) -> None:
    write_case(folder, "BraTS2021_00001", seg=False)
    save_nifti(_seg_data(), folder / "BraTS2021_00002_seg.nii.gz", affine=AFFINE)


def _not_a_folder(folder: Path) -> None:
    folder.write_bytes(b"a file")


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (_missing_t1ce, MissingModalityError, r"lacks t1ce"),
        (_missing_t1, MissingModalityError, r"lacks t1 \("),
        (lambda folder: folder.mkdir(), MissingModalityError, "no NIfTI files"),
        (_duplicate_flair, MissingModalityError, "2 files for flair"),
        (_duplicate_seg, DatasetLayoutError, "2 files for seg"),
        (_two_segm_files, DatasetLayoutError, "several \\*Segm files"),
        (_two_cases_in_one_folder, DatasetLayoutError, "several cases"),
        (_seg_of_other_case, DatasetLayoutError, "several cases"),
        (_not_a_folder, DatasetLayoutError, "not a folder"),
        (lambda folder: None, DatasetLayoutError, "not a folder"),
    ],
    ids=[
        "missing_t1ce", "missing_t1", "empty_folder", "duplicate_flair", "duplicate_seg", "two_segm",
        "two_cases", "seg_of_other_case", "a_file", "absent",
    ],
)
def test_find_case_errors(tmp_path: Path, make, error: type, message: str) -> None:
    folder = tmp_path / "case"
    make(folder)
    with pytest.raises(error, match=message):
        find_case(folder)


# ----------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_load_case_returns_channels_in_modality_order(tmp_path: Path, ext: str) -> None:
    written = write_case(tmp_path / "c", "BraTS20_Training_001", ext=ext)
    loaded = load_case(find_case(tmp_path / "c"))
    assert loaded.case_id == "BraTS20_Training_001"
    assert loaded.channels.dtype == np.float32 and loaded.channels.shape == (4, *SHAPE)
    for index, modality in enumerate(MODALITIES):
        np.testing.assert_array_equal(loaded.channels[index], written[modality])
    assert loaded.seg is not None and loaded.seg.dtype == np.uint8
    np.testing.assert_array_equal(loaded.seg, written["seg"])
    assert loaded.reference.path is not None and loaded.reference.path.name.endswith(f"_flair{ext}")
    np.testing.assert_allclose(loaded.reference.affine, AFFINE, atol=1e-6)
    assert load_case(find_case(tmp_path / "c"), with_seg=False).seg is None


def _replace(folder: Path, kind: str, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    save_nifti(data, folder / f"BraTS2021_00001_{kind}.nii.gz", affine=affine)


def _shifted(mm: float) -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] += mm
    return affine


def _with(value: float, at: tuple[int, int, int] = (6, 5, 4), kind: str = "t2", dtype=np.float32) -> np.ndarray:
    data = (_seg_data() if kind == "seg" else _modality_data(MODALITIES.index(kind))).astype(dtype)
    data[at] = value
    return data


BROKEN_CASES = [
    # (id, modality file to replace, data, affine, error, message)
    ("4d_t1", "t1", np.zeros((*SHAPE, 2), np.int16), AFFINE, BadDimensionsError, "t1 has shape"),
    ("shape_t1ce", "t1ce", np.zeros((12, 10, 9), np.int16), AFFINE, VolumeMismatchError, r"\(12, 10, 9\)"),
    ("affine_t2", "t2", _modality_data(2), _shifted(0.01), VolumeMismatchError, "t2 is on another grid"),
    ("nan_t2", "t2", _with(np.nan), AFFINE, NonFiniteError, "t2"),
    ("inf_flair", "flair", _with(np.inf, kind="flair"), AFFINE, NonFiniteError, "flair"),
    ("label_3", "seg", _with(3, kind="seg", dtype=np.uint8), AFFINE, InvalidLabelsError, r"\[3\].*map 3 -> 4"),
    ("label_5", "seg", _with(5, kind="seg", dtype=np.uint8), AFFINE, InvalidLabelsError, r"\[5\]"),
    ("label_1_5", "seg", _with(1.5, kind="seg"), AFFINE, InvalidLabelsError, "non-integer"),
    ("seg_nan", "seg", _with(np.nan, kind="seg"), AFFINE, NonFiniteError, "seg"),
    ("seg_shape", "seg", np.zeros((12, 10, 7), np.uint8), AFFINE, VolumeMismatchError, "differ in shape"),
    ("seg_affine", "seg", _seg_data(), _shifted(1.0), VolumeMismatchError, "seg is on another grid"),
]


@pytest.mark.parametrize(
    ("kind", "data", "affine", "error", "message"), [c[1:] for c in BROKEN_CASES], ids=[c[0] for c in BROKEN_CASES]
)
def test_load_case_validation_errors(tmp_path: Path, kind, data, affine, error: type, message: str) -> None:
    folder = tmp_path / "BraTS2021_00001"
    write_case(folder, "BraTS2021_00001")
    _replace(folder, kind, data, affine)
    case = find_case(folder)
    with pytest.raises(error, match=message):
        load_case(case)
    if kind == "seg":  # the images themselves are fine
        assert load_case(case, with_seg=False).seg is None


@pytest.mark.parametrize(
    ("kind", "data", "affine"),
    [
        ("t1", _modality_data(0)[..., None], AFFINE),  # (X, Y, Z, 1) is a 3D volume
        ("t2", _modality_data(2), _shifted(1e-4)),  # float noise within tolerance
        ("seg", _seg_data().astype(np.float32), AFFINE),  # float-stored labels
    ],
    ids=["trailing_singleton", "affine_within_tolerance", "float_seg"],
)
def test_load_case_accepts_harmless_variants(tmp_path: Path, kind, data, affine) -> None:
    folder = tmp_path / "BraTS2021_00001"
    write_case(folder, "BraTS2021_00001")
    _replace(folder, kind, data, affine)
    loaded = load_case(find_case(folder))
    assert loaded.channels.shape == (4, *SHAPE)
    np.testing.assert_array_equal(loaded.seg, _seg_data())


def test_load_case_corrupt_file(tmp_path: Path) -> None:
    folder = tmp_path / "BraTS2021_00001"
    write_case(folder, "BraTS2021_00001")
    path = folder / "BraTS2021_00001_t1ce.nii.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(CorruptFileError, match="t1ce"):
        load_case(find_case(folder))


# ----------------------------------------------------------------------------------------- datasets


def _dataset(root: Path) -> None:
    for number in (3, 1, 2):
        write_case(root / f"BraTS20_Training_00{number}", f"BraTS20_Training_00{number}", ext=".nii")
    write_case(root / "BraTS20_Training_004", "BraTS20_Training_004", skip=("flair",))
    (root / "name_mapping.csv").write_text("a,b\n")
    (root / "__MACOSX").mkdir()
    (root / ".cache").mkdir()


def test_scan_dataset_collects_problems(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _dataset(tmp_path)
    cases, problems = scan_dataset(tmp_path)
    assert [c.case_id for c in cases] == [f"BraTS20_Training_00{n}" for n in (1, 2, 3)]
    assert [(p.folder.name, p.code) for p in problems] == [("BraTS20_Training_004", "missing_modality")]
    assert "flair" in problems[0].message and problems[0].to_dict()["error"] == "missing_modality"
    with caplog.at_level(logging.WARNING):
        assert [c.case_id for c in find_cases(tmp_path)] == [c.case_id for c in cases]
    assert "BraTS20_Training_004" in caplog.text
    with pytest.raises(DatasetLayoutError, match="BraTS20_Training_004"):
        find_cases(tmp_path, strict=True)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root.mkdir(), "no BraTS case folders"),
        (lambda root: write_case(root / "x", "BraTS2021_00001", skip=("t1",)), "1 broken case"),
        (lambda root: None, "not a folder"),
    ],
    ids=["empty", "only_broken", "absent"],
)
def test_find_cases_errors(tmp_path: Path, make, message: str) -> None:
    root = tmp_path / "root"
    make(root)
    with pytest.raises(DatasetLayoutError, match=message):
        find_cases(root)


def test_find_cases_accepts_a_case_folder(tmp_path: Path) -> None:
    write_case(tmp_path / "BraTS2021_00001", "BraTS2021_00001")
    assert [c.case_id for c in find_cases(tmp_path / "BraTS2021_00001")] == ["BraTS2021_00001"]


# ----------------------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("read_data", [True, False])
def test_inspect_good_case(tmp_path: Path, read_data: bool) -> None:
    written = write_case(tmp_path / "c", "BraTS20_Training_355", ext=".nii", seg_name="W39_1998.09.19_Segm.nii")
    report = inspect_case(tmp_path / "c", read_data=read_data)
    assert report["case_id"] == "BraTS20_Training_355"
    assert report["modalities"] == {m: f"BraTS20_Training_355_{m}.nii" for m in MODALITIES}
    assert report["seg"] == "W39_1998.09.19_Segm.nii"
    assert report["shape"] == list(SHAPE)
    assert report["spacing_mm"] == pytest.approx([1.0, 1.2, 2.0])
    assert report["orientation"] == "LPS"
    assert report["dtypes"] == {**{m: "int16" for m in MODALITIES}, "seg": "uint8"}
    assert report["problems"] == []
    if read_data:
        values, counts = np.unique(written["seg"], return_counts=True)
        assert {k: v["voxels"] for k, v in report["labels"].items()} == dict(zip(values.tolist(), counts.tolist()))
        assert report["labels"][2]["volume_ml"] == pytest.approx(counts[2] * 1.0 * 1.2 * 2.0 / 1000, abs=1e-3)
    else:
        assert report["labels"] is None


def test_inspect_collects_every_problem(tmp_path: Path) -> None:
    folder = tmp_path / "BraTS2021_00001"
    write_case(folder, "BraTS2021_00001", skip=("t1",))
    _replace(folder, "t2", _with(np.nan))
    _replace(folder, "seg", _with(3, kind="seg", dtype=np.uint8))
    (folder / "BraTS2021_00001_t1ce.nii.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    report = inspect_case(folder)
    codes = [p["error"] for p in report["problems"]]
    assert sorted(codes) == sorted(["missing_modality", "corrupt_file", "non_finite", "invalid_labels"])
    assert report["modalities"] == {m: f"BraTS2021_00001_{m}.nii.gz" for m in ("t1ce", "t2", "flair")}
    assert report["labels"][3]["name"] == "not a BraTS label"


def test_inspect_missing_folder() -> None:
    report = inspect_case("/nonexistent/case")
    assert [p["error"] for p in report["problems"]] == ["dataset_layout"]


@pytest.mark.parametrize("read_data", [True, False])
def test_inspect_dataset(tmp_path: Path, read_data: bool) -> None:
    _dataset(tmp_path)
    summary = inspect_dataset(tmp_path, read_data=read_data)
    assert summary["n_cases"] == 3 and summary["n_with_seg"] == 3
    assert summary["shapes"] == {"12x10x8": 3}
    assert summary["spacings_mm"] == {"1x1.2x2": 3}
    assert [p["error"] for p in summary["problems"]] == ["missing_modality"]
    if read_data:
        values, counts = np.unique(_seg_data(), return_counts=True)
        assert summary["label_voxels"] == {v: 3 * c for v, c in zip(values.tolist(), counts.tolist())}


# ------------------------------------------------------------------------------- BraTS 2023-2024 layout

#: MODALITIES name -> BraTS 2023-2024 file suffix
SUFFIX_2023 = {modality: name for name, modality in BRATS2023_MODALITIES.items()}


def _seg_2023(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """:func:`_seg_data` as a BraTS 2023-2024 file numbers it: enhancing tumour 3."""
    seg = _seg_data(shape)
    seg[seg == 4] = 3
    return seg


def write_case_2023(
    folder: Path,
    case_id: str,
    *,
    ext: str = ".nii.gz",
    seg: np.ndarray | None = None,
    with_seg: bool = True,
    skip: tuple[str, ...] = (),
    suffix_case=str.lower,
) -> dict[str, np.ndarray]:
    """Write a synthetic case as ``<case_id>-{t1n,t1c,t2w,t2f,seg}<ext>``; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for index, modality in enumerate(MODALITIES):
        if modality in skip:
            continue
        written[modality] = _modality_data(index)
        save_nifti(written[modality], folder / f"{case_id}-{suffix_case(SUFFIX_2023[modality])}{ext}", affine=AFFINE)
    if with_seg:
        written["seg"] = _seg_2023() if seg is None else seg
        save_nifti(written["seg"], folder / f"{case_id}-{suffix_case('seg')}{ext}", affine=AFFINE)
    return written


NAMING_2023 = [
    # (case_id, extension, with seg, suffix case)
    ("BraTS-GLI-00000-000", ".nii.gz", True, str.lower),
    ("BraTS-GLI-00002-001", ".nii.gz", False, str.lower),
    ("BraTS-MEN-00004-000", ".nii.gz", True, str.upper),
    ("BraTS-SSA-00002-000", ".nii", True, str.lower),
]


@pytest.mark.parametrize(("case_id", "ext", "with_seg", "suffix_case"), NAMING_2023)
def test_find_case_recognises_brats2023_naming(tmp_path: Path, case_id: str, ext: str, with_seg: bool,
                                               suffix_case) -> None:
    folder = tmp_path / case_id
    write_case_2023(folder, case_id, ext=ext, with_seg=with_seg, suffix_case=suffix_case)
    case = find_case(folder)
    assert (case.case_id, case.label_convention) == (case_id, BRATS2023)
    assert list(case.modalities) == list(MODALITIES)
    for modality, path in case.modalities.items():
        assert path.name == f"{case_id}-{suffix_case(SUFFIX_2023[modality])}{ext}"  # t1n is t1, t1c is t1ce
    assert (case.seg.name if case.seg else None) == (f"{case_id}-{suffix_case('seg')}{ext}" if with_seg else None)


def test_find_case_of_2021_naming_records_its_convention(tmp_path: Path) -> None:
    write_case(tmp_path / "c", "BraTS2021_00006")
    assert find_case(tmp_path / "c").label_convention == BRATS2021


def _missing_t2f(folder: Path) -> None:
    write_case_2023(folder, "BraTS-GLI-00000-000", skip=("flair",))


def _duplicate_t1c(folder: Path) -> None:
    write_case_2023(folder, "BraTS-GLI-00000-000")
    save_nifti(_modality_data(1), folder / "BraTS-GLI-00000-000-t1c.nii", affine=AFFINE)


def _mixed_layouts(folder: Path) -> None:
    write_case_2023(folder, "BraTS-GLI-00000-000", skip=("t2",))
    save_nifti(_modality_data(2), folder / "BraTS-GLI-00000-000_t2.nii.gz", affine=AFFINE)


def _seg_of_2021_layout(folder: Path) -> None:
    write_case_2023(folder, "BraTS-GLI-00000-000", with_seg=False)
    save_nifti(_seg_data(), folder / "BraTS-GLI-00000-000_seg.nii.gz", affine=AFFINE)


def _two_2023_cases(folder: Path) -> None:
    write_case_2023(folder, "BraTS-GLI-00000-000", with_seg=False)
    save_nifti(_seg_2023(), folder / "BraTS-GLI-00001-000-seg.nii.gz", affine=AFFINE)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (_missing_t2f, MissingModalityError, r"lacks t2f \(flair\) \(expected files named <case>-\{t1n,t1c,t2w,t2f"),
        (_duplicate_t1c, MissingModalityError, r"2 files for t1c \(t1ce\)"),
        (_mixed_layouts, DatasetLayoutError, r"mixes file naming of two BraTS layouts.*_t2\.nii\.gz"),
        (_seg_of_2021_layout, DatasetLayoutError, "mixes file naming"),
        (_two_2023_cases, DatasetLayoutError, "several cases"),
        (lambda folder: folder.mkdir(), MissingModalityError, r"<case>_\{t1,t1ce.* or <case>-\{t1n,t1c"),
    ],
    ids=["missing_t2f", "duplicate_t1c", "mixed_modalities", "seg_of_other_layout", "two_cases", "empty_folder"],
)
def test_find_case_errors_2023_layout(tmp_path: Path, make, error: type, message: str) -> None:
    folder = tmp_path / "case"
    make(folder)
    with pytest.raises(error, match=message):
        find_case(folder)


LABEL_CONVERSION = [
    # (layout writer, labels stored in the seg file, labels load_case returns, convention)
    (write_case, [0, 1, 2, 4], [0, 1, 2, 4], BRATS2021),
    (write_case_2023, [0, 1, 2, 3], [0, 1, 2, 4], BRATS2023),
    (write_case_2023, [0, 2], [0, 2], BRATS2023),  # no enhancing tumour: nothing to convert
]


@pytest.mark.parametrize(("writer", "stored", "loaded_labels", "convention"), LABEL_CONVERSION,
                         ids=["2021_as_is", "2023_3_becomes_4", "2023_without_et"])
def test_load_case_returns_brainscan_labels(tmp_path: Path, writer, stored: list[int], loaded_labels: list[int],
                                            convention: str) -> None:
    seg = np.zeros(SHAPE, np.uint8)
    for index, label in enumerate(stored):
        seg[index + 2 : index + 4, 3:7, 2:6] = label
    folder = tmp_path / "case"
    if writer is write_case_2023:
        written = write_case_2023(folder, "BraTS-GLI-00000-000", seg=seg)
    else:
        written = write_case(folder, "BraTS2021_00001")
        _replace(folder, "seg", seg)
    loaded = load_case(find_case(folder))
    assert loaded.label_convention == convention
    assert loaded.seg is not None and loaded.seg.dtype == np.uint8
    assert np.unique(loaded.seg).tolist() == loaded_labels
    expected = seg.copy()
    expected[seg == 3] = 4
    np.testing.assert_array_equal(loaded.seg, expected)
    for index, modality in enumerate(MODALITIES):
        np.testing.assert_array_equal(loaded.channels[index], written[modality])


BAD_LABELS = [
    # (layout writer, bad label in the seg file, words the message must hold)
    (write_case_2023, 4, r"\[4\] outside the BraTS 2023-2024 label set \[0, 1, 2, 3\].*4 is enhancing tumour in "
                         r"BraTS 2018-2021 files.*<case>_\{t1,t1ce,t2,flair,seg\}.*map 4 -> 3"),
    (write_case, 3, r"\[3\] outside the BraTS 2018-2021 label set \[0, 1, 2, 4\].*3 is enhancing tumour in "
                    r"BraTS 2023-2024 files.*<case>-\{t1n,t1c,t2w,t2f,seg\}.*map 3 -> 4"),
    (write_case_2023, 5, r"\[5\] outside the BraTS 2023-2024 label set"),
]


@pytest.mark.parametrize(("writer", "bad", "message"), BAD_LABELS, ids=["4_in_2023", "3_in_2021", "5_in_2023"])
def test_load_case_refuses_labels_of_the_other_convention(tmp_path: Path, writer, bad: int, message: str) -> None:
    seg = _seg_2023() if writer is write_case_2023 else _seg_data()
    seg[2, 2, 2] = bad
    folder = tmp_path / "case"
    if writer is write_case_2023:
        write_case_2023(folder, "BraTS-GLI-00000-000", seg=seg)
    else:
        write_case(folder, "BraTS2021_00001")
        _replace(folder, "seg", seg)
    case = find_case(folder)
    with pytest.raises(InvalidLabelsError, match=message):
        load_case(case)
    assert load_case(case, with_seg=False).seg is None
    problems = inspect_case(folder)["problems"]
    assert [p["error"] for p in problems] == ["invalid_labels"] and f"[{bad}]" in problems[0]["detail"]


@pytest.mark.parametrize("read_data", [True, False])
def test_inspect_2023_case_names_labels_in_its_convention(tmp_path: Path, read_data: bool) -> None:
    written = write_case_2023(tmp_path / "c", "BraTS-GLI-00000-000")
    report = inspect_case(tmp_path / "c", read_data=read_data)
    assert (report["case_id"], report["label_convention"]) == ("BraTS-GLI-00000-000", BRATS2023)
    assert report["modalities"] == {m: f"BraTS-GLI-00000-000-{SUFFIX_2023[m]}.nii.gz" for m in MODALITIES}
    assert report["seg"] == "BraTS-GLI-00000-000-seg.nii.gz"
    assert report["problems"] == []
    if read_data:
        values, counts = np.unique(written["seg"], return_counts=True)
        assert {k: v["voxels"] for k, v in report["labels"].items()} == dict(zip(values.tolist(), counts.tolist()))
        assert {k: v["name"] for k, v in report["labels"].items()} == {0: "background", 1: "NCR", 2: "ED", 3: "ET"}
    else:
        assert report["labels"] is None


def test_inspect_dataset_counts_cases_per_convention(tmp_path: Path) -> None:
    write_case(tmp_path / "BraTS2021_00001", "BraTS2021_00001")
    write_case_2023(tmp_path / "BraTS-GLI-00000-000", "BraTS-GLI-00000-000")
    write_case_2023(tmp_path / "BraTS-GLI-00001-000", "BraTS-GLI-00001-000", with_seg=False)
    summary = inspect_dataset(tmp_path, read_data=True)
    assert summary["label_conventions"] == {BRATS2021: 1, BRATS2023: 2}
    assert (summary["n_cases"], summary["n_with_seg"], summary["problems"]) == (3, 2, [])
    assert [c.label_convention for c in find_cases(tmp_path)] == [BRATS2023, BRATS2023, BRATS2021]


# ----------------------------------------------------------------------------------------- real data


@needs_brats_sample
def test_real_case_find_and_inspect() -> None:
    case = find_case(BRATS_SAMPLE)
    assert case.case_id == "BraTS2021_00006"
    assert case.modalities["t1"].name == "BraTS2021_00006_t1.nii.gz"
    assert case.modalities["t1ce"].name == "BraTS2021_00006_t1ce.nii.gz"
    report = inspect_case(BRATS_SAMPLE)
    assert report["problems"] == []
    assert report["shape"] == [240, 240, 155]
    assert report["spacing_mm"] == pytest.approx([1.0, 1.0, 1.0])
    seg = np.asanyarray(nib.load(str(BRATS_SAMPLE / "BraTS2021_00006_seg.nii.gz")).dataobj)
    values, counts = np.unique(seg, return_counts=True)
    assert set(values.tolist()) == {0, 1, 2, 4}
    assert {k: v["voxels"] for k, v in report["labels"].items()} == dict(zip(values.tolist(), counts.tolist()))


@needs_brats_sample
def test_real_case_load() -> None:
    loaded = load_case(find_case(BRATS_SAMPLE))
    assert loaded.channels.shape == (4, 240, 240, 155) and loaded.channels.dtype == np.float32
    t1ce = np.asanyarray(nib.load(str(BRATS_SAMPLE / "BraTS2021_00006_t1ce.nii.gz")).dataobj)
    np.testing.assert_array_equal(loaded.channels[MODALITIES.index("t1ce")], t1ce)
    assert loaded.seg is not None and loaded.seg.shape == (240, 240, 155)
    assert loaded.reference.spacing == pytest.approx((1.0, 1.0, 1.0))
