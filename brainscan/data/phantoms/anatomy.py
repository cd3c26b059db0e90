"""Real brain anatomy for the phantoms: the MNI ICBM152 2009a template that ships in nilearn's wheel.

The phantoms draw tumours on a real brain rather than on spheres, so a model trained on them has to
find a lesion among gyri, ventricles and grey/white-matter contrast. The template files are read
straight from the installed nilearn package (nilearn itself is never imported: importing it pulls
in pandas and sklearn for nothing), once per process.

Template notice (it must accompany any copy of the template or of data derived from it)::

    Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
    Institute, McGill University. Permission to use, copy, modify, and distribute this software and
    its documentation for any purpose and without fee is hereby granted, provided that the above
    copyright notice appear in all copies. The authors and McGill University make no
    representations about the suitability of this software for any purpose. It is provided "as is"
    without express or implied warranty.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from brainscan.io.nifti import load_nifti

MNI_TEMPLATE_NOTICE = (
    "Synthetic phantom data derived from the MNI ICBM152 2009a nonlinear symmetric template.\n"
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological\n"
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software and\n"
    "its documentation for any purpose and without fee is hereby granted, provided that the above\n"
    "copyright notice appear in all copies. The authors and McGill University make no\n"
    "representations about the suitability of this software for any purpose. It is provided\n"
    '"as is" without express or implied warranty.\n'
    "Not patient data. Not for clinical use.\n"
)
NOTICE_FILENAME = "MNI_ICBM152_NOTICE.txt"

_TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_TEMPLATE_SHAPE = (197, 233, 189)

#: The BraTS grid (SRI24 space, 1 mm): shape and the affine real BraTS files carry (LPS voxel order).
BRATS_GRID_SHAPE: tuple[int, int, int] = (240, 240, 155)
BRATS_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
# Where the template goes in the BraTS grid: padding (before, after) per MNI axis, then a flip of
# x and y (RAS -> LPS). The brain ends up centred in x/y and wholly inside the 155 slices.
_BRATS_PAD = ((21, 22), (1, 6), (0, 0))
_BRATS_Z_SLICE = slice(1, 156)

# Seed domains keep the BraTS and Kaggle random streams apart for the same user seed.
SEED_DOMAINS: dict[str, int] = {"brats": 20, "kaggle": 2021}


@dataclass(frozen=True)
class TemplateAnatomy:
    """The template at 1 mm in its own RAS voxel grid (197 x 233 x 189).

    Attributes:
        t1: T1-weighted intensities, float32 in [0, 1], zero outside the brain (skull-stripped).
        gm, wm, csf: tissue probabilities, float32 in [0, 1]; ``csf`` is brain minus GM minus WM.
        brain: boolean brain mask (includes ventricles and the CSF around the cortex).
        affine: voxel-to-MNI-millimetre matrix (identity rotation, 1 mm).
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class GridAnatomy:
    """The template resampled onto a BraTS-style grid (LPS voxel order).

    Attributes:
        t1, gm, wm, csf: float32 ``(X, Y, Z)`` in [0, 1].
        brain: bool ``(X, Y, Z)``.
        affine: 4x4 voxel-to-world matrix; :data:`BRATS_AFFINE` scaled by the voxel spacing.
        spacing: voxel size in millimetres per axis.
        centre_candidates: ``(N, 3)`` float voxel coordinates where a tumour centre may go (deep
            white matter, at least 15 mm from the midline and 20 mm from the brain surface).
        midline_x: the voxel x coordinate of the midsagittal plane.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    centre_candidates: np.ndarray
    midline_x: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.brain.shape)  # type: ignore[return-value]


def template_dir() -> Path:
    """Folder of nilearn's bundled data files, found without importing nilearn.

    Raises:
        ImportError: if nilearn is not installed (it is a core dependency of brainscan).
        FileNotFoundError: if the installed nilearn lacks the ICBM152 files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the phantoms need the MNI ICBM152 template that ships with nilearn; "
            "install it with `pip install nilearn` (it is listed in brainscan's dependencies)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [k for k in ("t1", "gm", "wm") if not (folder / _TEMPLATE_FILE.format(k)).is_file()]
    if missing:
        raise FileNotFoundError(
            f"nilearn at {folder.parent.parent} lacks the ICBM152 template files {missing}; "
            "reinstall nilearn (>= 0.10) from its wheel"
        )
    return folder


@lru_cache(maxsize=1)
def load_template() -> TemplateAnatomy:
    """Read the ICBM152 2009a T1, GM and WM maps (once per process) and derive brain and CSF.

    Returns:
        The :class:`TemplateAnatomy`; its arrays are read-only because they are shared.
    """
    folder = template_dir()
    vols = {k: load_nifti(folder / _TEMPLATE_FILE.format(k)) for k in ("t1", "gm", "wm")}
    for key, vol in vols.items():
        if vol.shape != _TEMPLATE_SHAPE:
            raise FileNotFoundError(
                f"unexpected ICBM152 {key} template shape {vol.shape}, expected {_TEMPLATE_SHAPE}"
            )
    t1, gm, wm = (np.asarray(vols[k].data, dtype=np.float32) / 255.0 for k in ("t1", "gm", "wm"))
    # The template T1 is already skull-stripped: its non-zero support is the brain mask used upstream.
    brain = ndi.binary_fill_holes(t1 > 0)
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    arrays = {"t1": t1, "gm": gm * brain, "wm": wm * brain, "csf": csf, "brain": brain}
    for arr in arrays.values():
        arr.setflags(write=False)
    return TemplateAnatomy(affine=vols["t1"].affine, **arrays)


class TemplateSlicer:
    """One 2D section of the template, in display orientation, on a padded canvas (1 px = 1 mm).

    Display conventions as in clinical viewers: axial with anterior up and the patient's right on
    the image's left; coronal superior up, right on the left; sagittal superior up, anterior left.

    Args:
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        slice_mm: MNI coordinate of the section along its normal (z, y or x); rounded to the
            nearest template slice, which :attr:`slice_mm` then reports.
        pad: millimetres of empty canvas around the template (room for skull, scalp, rotation).
    """

    NORMAL_AXIS: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}
    # (normal axis, row axis, col axis) in template voxel axes; rows and cols run backwards.
    _AXES = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}

    def __init__(self, plane: str, slice_mm: float, pad: int = 40) -> None:
        if plane not in self._AXES:
            raise ValueError(f"plane must be one of {list(self._AXES)}, got {plane!r}")
        template = load_template()
        self.plane = plane
        self.pad = int(pad)
        self.axes = self._AXES[plane]
        self.origin = -template.affine[:3, 3]  # MNI mm + origin = voxel index
        self.dims = template.brain.shape
        normal = self.axes[0]
        self.index = int(np.clip(round(slice_mm + self.origin[normal]), 0, self.dims[normal] - 1))
        self.slice_mm = float(self.index - self.origin[normal])

    def take(self, volume: np.ndarray) -> np.ndarray:
        """The section of a template-grid volume, float32 ``(rows, cols)`` including the padding."""
        normal, row_axis, _ = self.axes
        # A view of the plane (np.take along a trailing axis copies element by element: 30x slower).
        section = volume[(slice(None),) * normal + (self.index,)]
        # Indexing keeps the other two axes in order; the row axis must come first.
        if [a for a in range(3) if a != normal].index(row_axis) != 0:
            section = section.T
        return np.pad(np.ascontiguousarray(section[::-1, ::-1]), self.pad).astype(np.float32)

    def to_pixel(self, xyz_mm: Sequence[float]) -> tuple[float, float, float]:
        """``(row, col, offset_mm)``: canvas pixel of an MNI point and its distance from the plane."""
        voxel = np.asarray(xyz_mm, dtype=float) + self.origin
        normal, row_axis, col_axis = self.axes
        row = self.dims[row_axis] - 1 - voxel[row_axis] + self.pad
        col = self.dims[col_axis] - 1 - voxel[col_axis] + self.pad
        return float(row), float(col), float(xyz_mm[normal] - self.slice_mm)

    def to_mm(self, row: float, col: float) -> tuple[float, float, float]:
        """MNI ``(x, y, z)`` of a canvas pixel (inverse of :meth:`to_pixel` within the plane)."""
        normal, row_axis, col_axis = self.axes
        voxel = np.zeros(3)
        voxel[row_axis] = self.dims[row_axis] - 1 - (row - self.pad)
        voxel[col_axis] = self.dims[col_axis] - 1 - (col - self.pad)
        voxel[normal] = self.index
        return tuple(float(v) for v in voxel - self.origin)  # type: ignore[return-value]


@lru_cache(maxsize=1)
def slice_ranges() -> dict[str, tuple[float, float]]:
    """MNI range per plane where sections cut a good part of the brain (>= 40% of the largest)."""
    template = load_template()
    origin = -template.affine[:3, 3]
    ranges = {}
    for plane, normal in TemplateSlicer.NORMAL_AXIS.items():
        area = template.brain.sum(axis=tuple(a for a in range(3) if a != normal))
        good = np.flatnonzero(area >= 0.4 * area.max())
        ranges[plane] = (float(good[0] - origin[normal]), float(good[-1] - origin[normal]))
    return ranges


def _to_brats_grid(arr: np.ndarray) -> np.ndarray:
    """Place a template-grid array (RAS) into the 240 x 240 x 155 BraTS grid (LPS)."""
    padded = np.pad(arr, _BRATS_PAD)[:, :, _BRATS_Z_SLICE]
    return np.ascontiguousarray(padded[::-1, ::-1, :])


def grid_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """Affine of a grid spanning the BraTS field of view with ``shape`` voxels.

    The corner voxels coincide with those of the 1 mm BraTS grid (the sampling of
    ``scipy.ndimage.zoom``), so the head has the same physical size at every shape.
    """
    scale = [(full - 1) / (n - 1) for full, n in zip(BRATS_GRID_SHAPE, shape)]
    return BRATS_AFFINE @ np.diag([*scale, 1.0])


def _resample(arr: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    if arr.shape == shape:
        return arr.astype(np.float32, copy=True)
    factors = [n / s for n, s in zip(shape, arr.shape)]
    out = ndi.zoom(arr.astype(np.float32, copy=False), factors, order=1, output=np.float32, mode="nearest")
    if out.shape != shape:  # zoom rounds the output shape; factors chosen above make it exact
        raise AssertionError(f"resampled to {out.shape}, expected {shape}")
    return out


@lru_cache(maxsize=4)
def brats_grid_anatomy(shape: tuple[int, int, int] = BRATS_GRID_SHAPE) -> GridAnatomy:
    """The template on a BraTS-like grid of ``shape`` voxels (cached per shape).

    Args:
        shape: ``(X, Y, Z)``; ``(240, 240, 155)`` is the real BraTS grid at 1 mm, smaller shapes
            cover the same field of view with larger voxels.

    Returns:
        The :class:`GridAnatomy` (read-only arrays).
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    template = load_template()
    maps = {k: _resample(_to_brats_grid(getattr(template, k)), shape) for k in ("t1", "gm", "wm", "csf")}
    brain = _resample(_to_brats_grid(template.brain.astype(np.float32)), shape) > 0.5
    for key in maps:
        maps[key] = np.clip(maps[key], 0.0, 1.0) * brain
    affine = grid_affine(shape)
    spacing = tuple(float(s) for s in np.abs(np.diag(affine)[:3]))
    candidates, midline = _centre_candidates(template, shape)
    for arr in (*maps.values(), brain, candidates):
        arr.setflags(write=False)
    return GridAnatomy(
        brain=brain, affine=affine, spacing=spacing, centre_candidates=candidates, midline_x=midline, **maps
    )


def _centre_candidates(template: TemplateAnatomy, shape: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    """Deep white-matter voxels, away from midline and surface, in ``shape``-grid voxel coordinates."""
    step = 3  # a 3 mm lattice is plenty for choosing a centre, and keeps the distance map cheap
    brain = _to_brats_grid(template.brain)[::step, ::step, ::step]
    wm = _to_brats_grid(template.wm)[::step, ::step, ::step]
    depth_mm = ndi.distance_transform_edt(brain) * step
    full = np.argwhere((wm > 0.6) & (depth_mm >= 20.0)).astype(np.float64) * step
    # The midsagittal plane (MNI x = 0, template index 98) in BraTS-grid x after padding and flip.
    midline_full = BRATS_GRID_SHAPE[0] - 1 - (98 + _BRATS_PAD[0][0])
    full = full[np.abs(full[:, 0] - midline_full) >= 15.0]
    scale = np.array([(n - 1) / (f - 1) for f, n in zip(BRATS_GRID_SHAPE, shape)])
    return full * scale, midline_full * scale[0]


def seeded_rng(domain: str, seed: int | Sequence[int]) -> np.random.Generator:
    """A PCG64 generator for one phantom, independent of every other (domain, seed) pair.

    Args:
        domain: ``"brats"`` or ``"kaggle"`` (keeps their streams apart for the same seed).
        seed: a non-negative int, or a tuple of them such as ``(dataset_seed, case_index)``.

    Raises:
        ValueError: for an unknown domain or a negative / non-integer seed.
    """
    if domain not in SEED_DOMAINS:
        raise ValueError(f"domain must be one of {list(SEED_DOMAINS)}, got {domain!r}")
    parts = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, np.integer)) or part < 0:
            raise ValueError(f"seed must be a non-negative int or a tuple of them, got {seed!r}")
    entropy = [SEED_DOMAINS[domain], *(int(p) for p in parts)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def smooth_noise_3d(rng: np.random.Generator, shape: tuple[int, ...], cells: int = 5) -> np.ndarray:
    """Smooth random field of ``shape`` with about ``cells`` bumps per axis, zero mean, unit std (float32).

    Cubic interpolation of a coarse lattice onto at most 32 samples per axis, then linear
    interpolation up to ``shape``: as smooth as cubic at the bump scale, at a fraction of its cost.
    """
    coarse = rng.standard_normal((cells,) * len(shape))
    middle = [min(max(s, 2), 32) for s in shape]
    field = ndi.zoom(coarse, [m / cells for m in middle], order=3, mode="mirror")
    field = ndi.zoom(field.astype(np.float32), [max(s, 2) / m for s, m in zip(shape, field.shape)], order=1)
    field = field[tuple(slice(0, s) for s in shape)]
    std = float(field.std())
    return (field - float(field.mean())) / (std if std > 0 else 1.0)


def smooth_noise_2d(rng: np.random.Generator, shape: tuple[int, int], cells: int = 8) -> np.ndarray:
    """2D version of :func:`smooth_noise_3d` (cubic upsampling of a ``cells`` x ``cells`` lattice)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    std = float(field.std())
    return (field - float(field.mean())) / (std if std > 0 else 1.0)
