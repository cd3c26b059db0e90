"""Synthetic BraTS cases: four MRI modalities and a tumour label map on a real template brain.

Each case is the MNI ICBM152 brain on the BraTS grid, given per-modality tissue contrast, a smooth
bias field, Rician noise and a random intensity scale, with a glioma drawn in: a necrotic core
(label 1) inside an enhancing rim (label 4) inside peritumoral edema (label 2). The contrast is
driven by the label map itself, so the mask is exactly what the images show, and the
contrasts follow radiology: enhancing tumour bright on T1ce, necrosis dark on T1/T1ce and bright
on T2, edema bright on T2 and FLAIR, the whole tumour mildly dark on T1.

Example:
    >>> paths = write_brats_phantoms("/tmp/brats", n=4, seed=0)   # the four case folders
    >>> channels, seg, affine = make_brats_phantom((0, 1))        # case 001 of seed 0, in memory
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from brainscan.data.phantoms.anatomy import (
    BRATS_GRID_SHAPE,
    MNI_TEMPLATE_NOTICE,
    NOTICE_FILENAME,
    GridAnatomy,
    brats_grid_anatomy,
    seeded_rng,
    smooth_noise_3d,
)
from brainscan.io.nifti import save_nifti
from brainscan.labels import MODALITIES

#: Default phantom grid: the BraTS field of view at about 2.5 mm, small enough for CPU tests.
DEFAULT_BRATS_SHAPE: tuple[int, int, int] = (96, 96, 64)

# Tissue signal relative to white matter on T1; each modality's WM/GM/CSF ordering follows
# clinical MRI (T2: CSF brightest; FLAIR: CSF suppressed, GM a little above WM).
_TISSUE = {
    "t1": {"wm": 1.00, "gm": 0.72, "csf": 0.28},
    "t1ce": {"wm": 1.00, "gm": 0.76, "csf": 0.30},
    "t2": {"wm": 0.45, "gm": 0.68, "csf": 1.40},
    "flair": {"wm": 0.62, "gm": 0.78, "csf": 0.12},
}
# Edema multiplies the underlying tissue signal (it is water in tissue); enhancing tumour and
# necrosis replace it with their own signal.
_EDEMA_GAIN = {"t1": 0.80, "t1ce": 0.82, "t2": 1.90, "flair": 1.75}
_ENHANCING = {"t1": 0.78, "t1ce": 1.65, "t2": 0.95, "flair": 1.05}
_NECROSIS = {"t1": 0.40, "t1ce": 0.32, "t2": 1.25, "flair": 0.65}

_NIFTI_DESCRIP = b"brainscan phantom; MNI ICBM152 2009a (C) 1993-2009 L. Collins, MNI, McGill"
_NEIGHBOURS_26 = np.ones((3, 3, 3), dtype=bool)


class _TumourWeights(NamedTuple):
    box: tuple[slice, ...]
    necrosis: np.ndarray
    edema: np.ndarray
    enhancing: np.ndarray


class BratsPhantom(NamedTuple):
    """One synthetic case in memory.

    Attributes:
        channels: int16 ``(4, X, Y, Z)`` in :data:`brainscan.labels.MODALITIES` order, 0 outside the brain.
        seg: uint8 ``(X, Y, Z)`` with BraTS labels {0, 1, 2, 4}.
        affine: 4x4 voxel-to-world matrix shared by all five volumes.
    """

    channels: np.ndarray
    seg: np.ndarray
    affine: np.ndarray


def brats_case_id(index: int) -> str:
    """BraTS 2020 training case name, e.g. ``BraTS20_Training_001`` for ``index=1``."""
    return f"BraTS20_Training_{index:03d}"


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and 16 <= s <= 512 for s in shape):
        raise ValueError(f"shape must be three ints in [16, 512], got {shape!r}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def make_brats_phantom(
    seed: int | Sequence[int] = 0,
    shape: Sequence[int] = DEFAULT_BRATS_SHAPE,
    *,
    full_size: bool = False,
    with_tumour: bool = True,
) -> BratsPhantom:
    """Generate one synthetic BraTS case in memory.

    Args:
        seed: non-negative int or tuple of ints; :func:`write_brats_phantoms` uses
            ``(seed, case_index)``. The same seed and shape always give the same arrays.
        shape: ``(X, Y, Z)`` grid; covers the BraTS field of view, so smaller shapes have larger voxels.
        full_size: use the real BraTS grid, 240 x 240 x 155 at 1 mm (overrides ``shape``).
        with_tumour: ``False`` gives a healthy brain (all-zero ``seg``).

    Returns:
        :class:`BratsPhantom` ``(channels (4, X, Y, Z) int16, seg (X, Y, Z) uint8, affine (4, 4))``.

    Raises:
        ValueError: for a bad ``shape`` or ``seed``.
    """
    shape = BRATS_GRID_SHAPE if full_size else _check_shape(shape)
    rng = seeded_rng("brats", seed)
    anatomy = brats_grid_anatomy(shape)
    seg = np.zeros(shape, dtype=np.uint8)
    tumour: _TumourWeights | None = None
    if with_tumour:
        box, local_seg = _draw_tumour(rng, anatomy)
        seg[box] = local_seg
        # Slightly blurred compartment masks: partial volume at the borders, nothing beyond them.
        weights = {
            label: ndi.gaussian_filter((local_seg == label).astype(np.float32), 0.5) for label in (1, 2, 4)
        }
        tumour = _TumourWeights(box=box, necrosis=weights[1], edema=weights[2], enhancing=weights[4])
    channels = np.stack([_render_modality(rng, anatomy, modality, tumour) for modality in MODALITIES])
    return BratsPhantom(channels=channels, seg=seg, affine=anatomy.affine.copy())


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _draw_tumour(rng: np.random.Generator, anatomy: GridAnatomy) -> tuple[tuple[slice, ...], np.ndarray]:
    """Nested tumour label map inside a bounding box of the grid.

    Returns:
        ``(box, local_seg)``: the box as slices of the grid and the uint8 labels inside it.
    """
    spacing = np.asarray(anatomy.spacing)
    candidates = anatomy.centre_candidates
    for _attempt in range(20):
        radius_edema = rng.uniform(20.0, 38.0, size=3)
        radius_core = radius_edema * rng.uniform(0.38, 0.6) * rng.uniform(0.9, 1.1, size=3)
        radius_necrosis = radius_core * rng.uniform(0.5, 0.8)
        has_necrosis = rng.random() < 0.8
        rotation = _random_rotation(rng)
        centre = candidates[rng.integers(len(candidates))] + rng.uniform(-1.5, 1.5, size=3) / spacing

        half = np.ceil(1.6 * radius_edema.max() / spacing).astype(int) + 2
        lo = np.maximum(np.floor(centre).astype(int) - half, 0)
        hi = np.minimum(np.floor(centre).astype(int) + half + 1, anatomy.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        box_shape = tuple(int(b - a) for a, b in zip(lo, hi))

        grids = np.meshgrid(*(np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)), indexing="ij")
        offset_mm = np.stack([(g - c) * s for g, c, s in zip(grids, centre, spacing)], axis=-1)
        local = offset_mm @ rotation.astype(np.float32)

        def ellipsoid(radii: np.ndarray) -> np.ndarray:
            return np.sqrt(np.sum((local / radii.astype(np.float32)) ** 2, axis=-1))

        def bumps() -> np.ndarray:
            cells = max(3, int(round(2 * radius_edema.max() / 12.0)))
            return np.clip(smooth_noise_3d(rng, box_shape, cells), -2.0, 2.0)

        # The falx keeps the tumour in the hemisphere of its centre.
        side = np.sign(centre[0] - anatomy.midline_x)
        hemisphere = side * (grids[0] - anatomy.midline_x) > 0.5
        brain = anatomy.brain[box] & hemisphere
        wm, csf = anatomy.wm[box], anatomy.csf[box]
        inner_brain = ndi.binary_erosion(brain, _NEIGHBOURS_26, border_value=1)

        d_edema = ellipsoid(radius_edema)
        # Edema spreads along white matter and spares CSF, so its outline follows the anatomy.
        edema = (d_edema + 0.3 * bumps() - 0.35 * (wm - 0.5) < 1.0) & (d_edema < 1.6) & brain & (csf < 0.5)
        core = (ellipsoid(radius_core) + 0.18 * bumps() < 1.0) & inner_brain
        core = _largest_component(core)
        if core.sum() < 8:
            continue
        necrosis = (ellipsoid(radius_necrosis) + 0.2 * bumps() < 1.0) if has_necrosis else np.zeros_like(core)
        # Necrosis never touches edema or background: it sits inside the enhancing rim.
        necrosis &= ndi.binary_erosion(core, _NEIGHBOURS_26)
        whole = edema | (ndi.binary_dilation(core, _NEIGHBOURS_26) & brain)
        labelled, _ = ndi.label(whole, _NEIGHBOURS_26)
        whole = np.isin(labelled, np.unique(labelled[core]))

        local_seg = np.zeros(box_shape, dtype=np.uint8)
        local_seg[whole] = 2
        local_seg[core] = 4
        local_seg[necrosis] = 1
        return box, local_seg
    raise RuntimeError("could not place a tumour in 20 attempts; the template grid is too coarse")


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndi.label(mask, _NEIGHBOURS_26)
    if count <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == (int(np.argmax(sizes)) + 1)


class _BrainVoxels(NamedTuple):
    """The brain voxels of a grid as flat vectors: rendering only them is 4-5x cheaper."""

    index: np.ndarray  # flat indices into the grid
    coords: tuple[np.ndarray, ...]  # per-axis voxel coordinates of the same voxels
    lookup: np.ndarray  # grid -> position in the vectors, -1 outside the brain
    tissue: dict[str, np.ndarray]  # t1, gm, wm, csf at those voxels


@lru_cache(maxsize=4)
def _brain_voxels(shape: tuple[int, int, int]) -> _BrainVoxels:
    anatomy = brats_grid_anatomy(shape)
    index = np.flatnonzero(anatomy.brain)
    coords = tuple(c.astype(np.int32) for c in np.unravel_index(index, shape))
    lookup = np.full(shape, -1, dtype=np.int32)
    lookup.flat[index] = np.arange(index.size, dtype=np.int32)
    tissue = {k: getattr(anatomy, k).ravel()[index] for k in ("t1", "gm", "wm", "csf")}
    return _BrainVoxels(index=index, coords=coords, lookup=lookup, tissue=tissue)


def _bias_field(
    rng: np.random.Generator, shape: tuple[int, ...], coords: tuple[np.ndarray, ...], strength: float
) -> np.ndarray:
    """Smooth multiplicative field at ``coords`` (separable quadratic in log space), ~``exp(+-strength)``."""
    field = np.ones(coords[0].shape, dtype=np.float32)
    for n, where in zip(shape, coords):
        x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        a, b = rng.normal(0.0, strength, size=2)
        field *= np.exp(a * x + b * (x * x - 1.0 / 3.0)).astype(np.float32)[where]
    return field


def _render_modality(
    rng: np.random.Generator,
    anatomy: GridAnatomy,
    modality: str,
    tumour: _TumourWeights | None,
) -> np.ndarray:
    """One int16 modality volume with tissue contrast, tumour, bias field, noise and random scale."""
    voxels = _brain_voxels(anatomy.shape)
    brain = voxels.tissue
    tissue = {k: v * rng.uniform(0.95, 1.05) for k, v in _TISSUE[modality].items()}
    image = tissue["wm"] * brain["wm"] + tissue["gm"] * brain["gm"] + tissue["csf"] * brain["csf"]
    if modality in ("t1", "t1ce"):
        # The template's own T1 texture (deep nuclei, myelination gradients) on top of the tissue model.
        image = 0.5 * image + 0.5 * tissue["wm"] * brain["t1"] / 0.87
    if tumour is not None:
        where = voxels.lookup[tumour.box]
        inside = where >= 0
        at = where[inside]
        local = image[at]
        texture = 1.0 + 0.08 * smooth_noise_3d(rng, where.shape, 6)[inside]
        edema = local * _EDEMA_GAIN[modality] * rng.uniform(0.92, 1.08)
        enhancing = _ENHANCING[modality] * rng.uniform(0.9, 1.1) * texture
        necrosis = _NECROSIS[modality] * rng.uniform(0.85, 1.15) * texture
        w_necrosis, w_edema, w_enhancing = (
            w[inside] for w in (tumour.necrosis, tumour.edema, tumour.enhancing)
        )
        image[at] = (
            local * (1.0 - w_necrosis - w_edema - w_enhancing)
            + w_edema * edema
            + w_enhancing * enhancing
            + w_necrosis * necrosis
        )
    image *= _bias_field(rng, anatomy.shape, voxels.coords, strength=rng.uniform(0.05, 0.2))
    sigma = rng.uniform(0.015, 0.04)
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag)  # magnitude of complex Gaussian noise: Rician
    scale = rng.uniform(250.0, 2000.0)
    # Skull-stripped like BraTS: exactly 0 outside the brain, never 0 inside it.
    volume = np.zeros(anatomy.shape, dtype=np.int16)
    volume.flat[voxels.index] = np.clip(np.rint(image * scale), 1, np.iinfo(np.int16).max)
    return volume


def write_brats_phantoms(
    out_dir: str | Path,
    n: int = 20,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_BRATS_SHAPE,
    full_size: bool = False,
) -> list[Path]:
    """Write ``n`` synthetic cases in the BraTS 2020 training layout.

    Layout: ``out_dir/BraTS20_Training_{i:03d}/BraTS20_Training_{i:03d}_{t1,t1ce,t2,flair,seg}.nii.gz``
    for ``i = 1..n``, int16 images and uint8 labels, plus the template's copyright notice
    (``MNI_ICBM152_NOTICE.txt``) in ``out_dir`` and in each file's header extension. Case ``i`` is
    ``make_brats_phantom((seed, i), ...)``, so a smaller set is byte-identical to the first cases
    of a larger one with the same seed.

    Args:
        out_dir: dataset root (created if missing).
        n: number of cases, >= 1.
        seed: non-negative dataset seed.
        shape: grid per case (see :func:`make_brats_phantom`).
        full_size: write 240 x 240 x 155 at 1 mm like real BraTS.

    Returns:
        The case folders, in order.

    Raises:
        ValueError: for a bad ``n``, ``seed`` or ``shape``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / NOTICE_FILENAME).write_text(MNI_TEMPLATE_NOTICE)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    header["descrip"] = _NIFTI_DESCRIP
    # The full template notice travels inside every file, as a NIfTI comment extension.
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", MNI_TEMPLATE_NOTICE.encode("ascii")))
    folders = []
    for index in range(1, n + 1):
        case_id = brats_case_id(index)
        folder = out_dir / case_id
        phantom = make_brats_phantom((seed, index), shape, full_size=full_size)
        for modality, volume in zip(MODALITIES, phantom.channels):
            save_nifti(volume, folder / f"{case_id}_{modality}.nii.gz", affine=phantom.affine, header=header)
        save_nifti(phantom.seg, folder / f"{case_id}_seg.nii.gz", affine=phantom.affine, header=header)
        folders.append(folder)
    return folders
