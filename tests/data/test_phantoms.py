"""Synthetic BraTS and Kaggle phantoms: layout, determinism, label structure, contrast, class cues."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from brainscan.data.phantoms import (
    BratsPhantom,
    make_brats_phantom,
    make_kaggle_phantom,
    make_kaggle_phantom_with_info,
    write_brats_phantoms,
    write_kaggle_phantoms,
)
from brainscan.data.phantoms import anatomy
from brainscan.data.phantoms.anatomy import BRATS_AFFINE, brats_grid_anatomy, load_template
from brainscan.io.nifti import load_nifti
from brainscan.labels import BRATS_LABELS, KAGGLE_CLASSES, MODALITIES

SMALL = (48, 48, 32)  # the BraTS field of view at 5 mm: enough anatomy, fast
N_CASES = 3
N_IMAGES = 8
CASE_FILE = re.compile(r"^(BraTS20_Training_\d{3})_(t1|t1ce|t2|flair|seg)\.nii\.gz$")
IMAGE_FILE = {
    split: re.compile(rf"^{code}-(gl|me|no|pi)_\d{{4}}\.jpg$")
    for split, code in (("Training", "Tr"), ("Testing", "Te"))
}
CODES = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}
NEIGHBOURS = np.ones((3, 3, 3), dtype=bool)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    write_brats_phantoms(root, n=N_CASES, seed=0, shape=SMALL)
    return root


@pytest.fixture(scope="module")
def kaggle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kaggle")
    write_kaggle_phantoms(root, n=N_IMAGES, seed=0, size=96)
    return root


@pytest.fixture(scope="module")
def cases() -> list[BratsPhantom]:
    """Default-shape cases in memory (the shape write_brats_phantoms uses by default)."""
    return [make_brats_phantom((0, i)) for i in range(1, 5)]


# ----------------------------------------------------------------------------- BraTS layout


def test_brats_layout_matches_brats2020_names(brats_root: Path) -> None:
    folders = sorted(p for p in brats_root.iterdir() if p.is_dir())
    assert [f.name for f in folders] == [f"BraTS20_Training_{i:03d}" for i in range(1, N_CASES + 1)]
    for folder in folders:
        names = sorted(p.name for p in folder.iterdir())
        assert len(names) == 5
        for name in names:
            match = CASE_FILE.match(name)
            assert match and match.group(1) == folder.name, name
        assert {CASE_FILE.match(n).group(2) for n in names} == {*MODALITIES, "seg"}
    assert "Louis Collins" in (brats_root / anatomy.NOTICE_FILENAME).read_text()


def test_brats_files_share_grid_and_types(brats_root: Path) -> None:
    folder = brats_root / "BraTS20_Training_001"
    volumes = {m: load_nifti(folder / f"{folder.name}_{m}.nii.gz") for m in (*MODALITIES, "seg")}
    affines = [v.affine for v in volumes.values()]
    assert all(v.shape == SMALL for v in volumes.values())
    assert all(np.array_equal(a, affines[0]) for a in affines)
    assert all(volumes[m].data.dtype == np.int16 for m in MODALITIES)
    assert volumes["seg"].data.dtype == np.uint8
    # Smaller grids keep the BraTS field of view: spacing * (n - 1) spans the 1 mm grid's 239 mm.
    assert np.allclose(np.array(volumes["seg"].spacing) * (np.array(SMALL) - 1), [239, 239, 154])
    assert np.allclose(affines[0][:3, 3], BRATS_AFFINE[:3, 3])


def test_full_size_is_the_brats_grid() -> None:
    channels, seg, affine = make_brats_phantom(7, full_size=True)
    assert channels.shape == (4, 240, 240, 155) and seg.shape == (240, 240, 155)
    assert np.array_equal(affine, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert set(np.unique(seg).tolist()) <= set(BRATS_LABELS) and (seg == 4).any()


# ----------------------------------------------------------------------------- determinism


def test_brats_same_seed_same_bytes_and_prefix(brats_root: Path, tmp_path: Path) -> None:
    # n=2 must be byte-identical to the first two cases of the n=3 set written by the fixture.
    write_brats_phantoms(tmp_path, n=2, seed=0, shape=SMALL)
    again = _tree_bytes(tmp_path)
    first = _tree_bytes(brats_root)
    assert again and all(first[name] == content for name, content in again.items())


@pytest.mark.parametrize("other_seed", [(1, 1), (0, 2)])
def test_brats_different_seed_differs(other_seed: tuple[int, int]) -> None:
    base = make_brats_phantom((0, 1), SMALL)
    other = make_brats_phantom(other_seed, SMALL)
    assert not np.array_equal(base.seg, other.seg)
    assert not np.array_equal(base.channels, other.channels)


def test_kaggle_same_seed_same_bytes_and_prefix(kaggle_root: Path, tmp_path: Path) -> None:
    write_kaggle_phantoms(tmp_path, n=4, seed=0, size=96)
    again = _tree_bytes(tmp_path)
    first = _tree_bytes(kaggle_root)
    assert len(again) == 4 and all(first[name] == content for name, content in again.items())
    write_kaggle_phantoms(tmp_path / "seed1", n=4, seed=1, size=96)
    other = _tree_bytes(tmp_path / "seed1")
    assert other.keys() == again.keys() and all(other[k] != again[k] for k in again)


# ----------------------------------------------------------------------------- BraTS labels and contrast


def test_labels_are_brats_and_nested(cases: list[BratsPhantom]) -> None:
    for channels, seg, _ in cases:
        assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= set(BRATS_LABELS)
        assert (seg == 2).any() and (seg == 4).any()
        # Necrosis sits inside the enhancing rim: its 26-neighbourhood is tumour core only.
        grown = ndi.binary_dilation(seg == 1, NEIGHBOURS)
        assert np.isin(seg[grown], (1, 4)).all()
        # The core never touches background, and the tumour lies inside the brain.
        assert (seg[ndi.binary_dilation(np.isin(seg, (1, 4)), NEIGHBOURS)] > 0).all()
        brain = (channels > 0).all(axis=0)
        assert brain[seg > 0].all()
        assert not channels[:, ~(channels > 0).any(axis=0)].any()  # zero background, skull-stripped
    assert sum(int((seg == 1).sum() > 0) for _, seg, _ in cases) >= 2  # most cases have necrosis


def test_one_tumour_in_one_hemisphere(cases: list[BratsPhantom]) -> None:
    midline = brats_grid_anatomy(cases[0].seg.shape).midline_x
    for _, seg, _ in cases:
        assert ndi.label(np.isin(seg, (1, 4)), NEIGHBOURS)[1] == 1
        tumour_x = np.argwhere(seg > 0)[:, 0]
        assert np.all(tumour_x < midline) or np.all(tumour_x > midline)


@pytest.mark.parametrize(
    ("modality", "brighter", "darker"),
    [
        ("t1ce", 4, 1),  # enhancing rim brighter than necrosis on post-contrast T1
        ("t1ce", 4, "wm"),  # enhancement brighter than normal white matter
        ("flair", 2, "wm"),  # edema bright on FLAIR
        ("t2", 2, "wm"),  # edema bright on T2
        ("t2", "csf", "wm"),  # CSF bright on T2
        ("flair", "wm", "csf"),  # CSF dark on FLAIR
        ("t1", "wm", "gm"),  # T1: WM > GM > CSF
        ("t1", "gm", "csf"),
        ("t1", "wm", 4),  # tumour mildly dark on T1
        ("t1", "wm", 1),  # necrosis dark on T1
    ],
)
def test_contrast_follows_radiology(cases: list[BratsPhantom], modality: str, brighter, darker) -> None:
    grid = brats_grid_anatomy(cases[0].seg.shape)
    tissue = {"wm": grid.wm > 0.9, "gm": grid.gm > 0.8, "csf": grid.csf > 0.9}
    channel = MODALITIES.index(modality)
    checked = 0
    for channels, seg, _ in cases:
        regions = [tissue[r] & (seg == 0) if isinstance(r, str) else seg == r for r in (brighter, darker)]
        if min(int(r.sum()) for r in regions) < 3:
            continue  # e.g. a case without necrosis
        image = channels[channel].astype(np.float64)
        assert image[regions[0]].mean() > image[regions[1]].mean()
        checked += 1
    assert checked >= 2


def test_healthy_phantom_has_no_tumour() -> None:
    channels, seg, _ = make_brats_phantom(3, SMALL, with_tumour=False)
    assert not seg.any() and (channels > 0).any()


# ----------------------------------------------------------------------------- Kaggle layout and images


def test_kaggle_layout_and_balanced_counts(kaggle_root: Path) -> None:
    split = kaggle_root / "Training"
    assert sorted(p.name for p in split.iterdir()) == sorted(KAGGLE_CLASSES)
    for label in KAGGLE_CLASSES:
        names = sorted(p.name for p in (split / label).iterdir())
        assert len(names) == N_IMAGES // 4
        assert all(IMAGE_FILE["Training"].match(n) and n[3:5] == CODES[label] for n in names), names
        assert names[0] == f"Tr-{CODES[label]}_0001.jpg"


@pytest.mark.parametrize(("n", "expected"), [(2, [1, 1, 0, 0]), (6, [2, 2, 1, 1])])
def test_kaggle_testing_split_and_uneven_n(tmp_path: Path, n: int, expected: list[int]) -> None:
    split = write_kaggle_phantoms(tmp_path, n=n, seed=2, size=64, split="Testing")
    assert split == tmp_path / "Testing"
    counts = [len(list((split / label).glob("*.jpg"))) for label in KAGGLE_CLASSES]
    assert counts == expected
    assert all(IMAGE_FILE["Testing"].match(p.name) for p in split.rglob("*.jpg"))


def test_kaggle_files_are_8bit_grey_baseline_jpegs(kaggle_root: Path) -> None:
    for path in sorted(kaggle_root.rglob("*.jpg")):
        raw = path.read_bytes()
        assert raw[:3] == b"\xff\xd8\xff" and b"\xff\xc0" in raw  # SOI, baseline SOF0
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape == (96, 96)
        assert image.max() > 100 and image[:3, :3].mean() < 25  # a bright head, dark border corner
        assert b"Louis Collins" in raw  # the template notice travels in the JPEG comment


@pytest.mark.parametrize("label", KAGGLE_CLASSES)
def test_make_kaggle_phantom_shape_and_determinism(label: str) -> None:
    image = make_kaggle_phantom(label, seed=5, size=80)
    assert image.dtype == np.uint8 and image.shape == (80, 80)
    assert np.array_equal(image, make_kaggle_phantom(label, seed=5, size=80))
    assert not np.array_equal(image, make_kaggle_phantom(label, seed=6, size=80))


def _in_brain(points_mm: np.ndarray) -> np.ndarray:
    template = load_template()
    voxels = np.rint(points_mm - template.affine[:3, 3]).astype(int)
    voxels = np.clip(voxels, 0, np.array(template.brain.shape) - 1)
    return template.brain[tuple(voxels.T)]


def _ring_mm(info, scale: float) -> np.ndarray:
    """Points on an in-plane circle around the lesion centre, in MNI mm."""
    normal = {"axial": 2, "coronal": 1, "sagittal": 0}[info.plane]
    in_plane = [a for a in range(3) if a != normal]
    angles = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    points = np.tile(np.asarray(info.lesion_mm, dtype=float), (36, 1))
    points[:, in_plane[0]] += scale * info.lesion_radius_mm * np.cos(angles)
    points[:, in_plane[1]] += scale * info.lesion_radius_mm * np.sin(angles)
    return points


@pytest.mark.parametrize("seed", range(6))
def test_kaggle_lesions_sit_where_the_class_says(seed: int) -> None:
    template = load_template()
    glioma = make_kaggle_phantom_with_info("glioma", seed, 128)[1]
    centre = np.rint(np.asarray(glioma.lesion_mm) - template.affine[:3, 3]).astype(int)
    assert template.wm[tuple(centre)] > 0.5  # intra-axial, in white matter
    assert _in_brain(_ring_mm(glioma, 1.0)).all()  # the whole mass is inside the brain

    meningioma = make_kaggle_phantom_with_info("meningioma", seed, 128)[1]
    on_falx = abs(meningioma.lesion_mm[0]) < meningioma.lesion_radius_mm
    assert on_falx or not _in_brain(_ring_mm(meningioma, 1.2)).all()  # reaches the dural surface

    pituitary = make_kaggle_phantom_with_info("pituitary", seed, 128)[1]
    assert abs(pituitary.lesion_mm[0]) < 3.0 and pituitary.lesion_mm[2] < -20.0  # midline skull base
    if pituitary.plane != "axial":
        assert pituitary.lesion_px[0] > 64  # below the brain centre on coronal / sagittal images

    notumor = make_kaggle_phantom_with_info("notumor", seed, 128)[1]
    assert notumor.lesion_mm is None and notumor.lesion_px is None
    for info in (glioma, meningioma, pituitary):
        assert all(0 <= v < 128 for v in info.lesion_px) and info.lesion_radius_px > 1


def test_kaggle_classes_not_separable_by_brightness() -> None:
    """Pairwise AUC of mean image intensity stays near chance: the lesion, not the gain, is the cue."""
    per_class = 16
    means = {
        label: np.array([make_kaggle_phantom(label, (9, k), 64).mean() for k in range(per_class)])
        for label in KAGGLE_CLASSES
    }
    for i, a in enumerate(KAGGLE_CLASSES):
        for b in KAGGLE_CLASSES[i + 1 :]:
            auc = float((means[a][:, None] > means[b][None, :]).mean())
            assert 0.2 < auc < 0.8, (a, b, auc)


# ----------------------------------------------------------------------------- bad arguments, environment


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_brats_phantom(0, (8, 96, 64)), "shape"),
        (lambda: make_brats_phantom(0, (96, 96)), "shape"),
        (lambda: make_brats_phantom(-1, SMALL), "seed"),
        (lambda: write_brats_phantoms("/nonexistent-never-written", n=0), "n must"),
        (lambda: make_kaggle_phantom("astrocytoma", 0), "label"),
        (lambda: make_kaggle_phantom("glioma", 0, size=8), "size"),
        (lambda: make_kaggle_phantom("glioma", "x"), "seed"),
        (lambda: write_kaggle_phantoms("/nonexistent-never-written", n=0), "n must"),
        (lambda: write_kaggle_phantoms("/nonexistent-never-written", split="Validation"), "split"),
    ],
)
def test_bad_arguments_name_the_value(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_missing_nilearn_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    def find_spec(name: str, *args):
        return None if name == "nilearn" else real_find_spec(name, *args)

    monkeypatch.setattr(anatomy.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install nilearn"):
        anatomy.template_dir()


def test_template_anatomy_is_consistent() -> None:
    template = load_template()
    assert template.brain.shape == (197, 233, 189)
    total = template.gm + template.wm + template.csf
    assert total[template.brain].max() <= 1.0 + 1e-5 and not total[~template.brain].any()
    assert load_template() is template  # cached


# ----------------------------------------------------------------------------- round trip through the readers


def test_brats_reader_reads_phantoms_back(brats_root: Path) -> None:
    brats = pytest.importorskip("brainscan.data.brats")
    found = brats.find_cases(brats_root)
    assert [c.case_id for c in found] == [f"BraTS20_Training_{i:03d}" for i in range(1, N_CASES + 1)]
    loaded = brats.load_case(found[0])
    expected = make_brats_phantom((0, 1), SMALL)
    assert loaded.channels.shape == (4, *SMALL)
    assert np.array_equal(loaded.channels, expected.channels.astype(np.float32))
    assert np.array_equal(loaded.seg, expected.seg)
    assert np.allclose(loaded.reference.affine, expected.affine)


def test_kaggle_reader_reads_phantoms_back(kaggle_root: Path) -> None:
    kaggle = pytest.importorskip("brainscan.data.kaggle")
    dataset = kaggle.read_kaggle_folder(kaggle_root)
    assert dataset.counts() == {"Training": dict.fromkeys(KAGGLE_CLASSES, N_IMAGES // 4)}
    assert dataset.problems == []
    split_only = kaggle.read_kaggle_folder(kaggle_root / "Training")
    assert split_only.counts()["Training"]["pituitary"] == N_IMAGES // 4
