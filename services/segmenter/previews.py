"""PNG previews of a segmentation: the flair slice through the tumour with the labels drawn over it.

Three planes through one point: the centre of mass of the whole tumour (labels 1, 2, 4), or the
centre of the volume when nothing was segmented. Slices are taken in RAS+ voxel order
(:func:`brainscan.io.nifti.to_ras`: flips and transposes, no resampling) and turned so they read
as radiologists expect:

- axial: anterior at the top, the patient's right on the image's left (radiological convention);
- coronal: superior at the top, the patient's right on the left;
- sagittal: superior at the top, anterior on the left.

Pixels are made square with the voxel spacing (linear for the image, nearest for the labels).
The flair is windowed between the 1st and 99th percentile of the brain voxels (non-zero) of the
whole volume, so the three planes share one grey scale. Labels are drawn with 50 % opacity in the
usual BraTS colours: NCR red, ED green, ET yellow.

Example:
    >>> pngs = render_previews(flair, mask, affine, spacing)     # {"axial": b"\\x89PNG...", ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from brainscan.io.nifti import to_ras
from brainscan.labels import BRATS_LABELS

#: RGB colour of each BraTS label in the previews
LABEL_COLOURS: dict[int, tuple[int, int, int]] = {1: (230, 40, 40), 2: (40, 200, 60), 4: (250, 220, 30)}
OVERLAY_ALPHA = 0.5
PLANES = ("axial", "coronal", "sagittal")


def tumour_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the whole tumour's centre of mass, or of the volume's centre if there is none.

    Args:
        mask: BraTS label map ``(X, Y, Z)``.

    Returns:
        ``(i, j, k)`` integer voxel indices inside the volume.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (X, Y, Z), got shape {mask.shape}")
    tumour = mask > 0
    if not tumour.any():
        return tuple(int(s // 2) for s in mask.shape)  # type: ignore[return-value]
    # from the three marginal voxel counts: ndimage.center_of_mass builds a coordinate grid per axis
    total = float(np.count_nonzero(tumour))
    centre = [float(np.dot(np.arange(n), tumour.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)))
              / total for axis, n in enumerate(tumour.shape)]
    return tuple(int(min(max(round(c), 0), s - 1)) for c, s in zip(centre, mask.shape))  # type: ignore[return-value]


def tumour_centre_record(mask: np.ndarray, affine: np.ndarray) -> dict[str, list] | None:
    """Where the tumour is, for the job's result: the same centre of mass as the previews, as voxel
    indices on the mask's grid (the file's axis order) and as world coordinates in mm (the affine's
    RAS+ scanner space, which NIfTI viewers such as the page's NiiVue place the crosshair in).

    Args:
        mask: BraTS label map ``(X, Y, Z)`` on the grid of ``affine``.
        affine: its 4x4 voxel-to-world matrix.

    Returns:
        ``{"voxel": [i, j, k], "mm": [x, y, z]}``, or ``None`` when nothing was segmented.
    """
    if not np.any(mask):
        return None
    voxel = tumour_centre(mask)
    world = np.asarray(affine, dtype=np.float64) @ np.array([*voxel, 1.0])
    return {"voxel": [int(v) for v in voxel], "mm": [round(float(c), 2) for c in world[:3]]}


def window(image: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0) -> tuple[float, float]:
    """Grey window ``(low, high)``: percentiles of the non-zero voxels (all voxels if none)."""
    if not 0 <= low_pct < high_pct <= 100:
        raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")
    flat = np.asarray(image).ravel(order="K")  # memory order: no copy of a Fortran-ordered (NIfTI) volume
    values = flat[flat != 0]
    if values.size == 0:
        values = flat
    low, high = (float(v) for v in np.percentile(values, [low_pct, high_pct]))
    # a constant image has no range to stretch; any positive width shows it as flat grey
    return low, high if high > low else low + 1.0


def plane_slices(volume_ras: np.ndarray, point: Sequence[int]) -> dict[str, np.ndarray]:
    """The three display-oriented slices of a RAS+ volume through ``point`` (RAS voxel indices).

    Returns:
        ``{"axial": (Y, X), "coronal": (Z, X), "sagittal": (Z, Y)}`` arrays as (rows, columns).
    """
    i, j, k = (int(p) for p in point)
    return {
        # rows: anterior (high y) first; columns: patient right (high x) first
        "axial": volume_ras[::-1, ::-1, k].T,
        # rows: superior (high z) first; columns: patient right first
        "coronal": volume_ras[::-1, j, ::-1].T,
        # rows: superior first; columns: anterior (high y) first
        "sagittal": volume_ras[i, ::-1, ::-1].T,
    }


def _plane_spacing(spacing_ras: Sequence[float]) -> dict[str, tuple[float, float]]:
    """(row, column) spacing in mm of each plane, in the order of :func:`plane_slices`."""
    sx, sy, sz = spacing_ras
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}


def _square_pixels(image: np.ndarray, spacing: tuple[float, float], interpolation: int) -> np.ndarray:
    row_mm, col_mm = spacing
    step = min(row_mm, col_mm)
    rows, cols = image.shape
    size = (max(1, round(cols * col_mm / step)), max(1, round(rows * row_mm / step)))
    if size == (cols, rows):
        return image
    return cv2.resize(image, size, interpolation=interpolation)


def render_plane(flair_slice: np.ndarray, label_slice: np.ndarray, grey_window: tuple[float, float],
                 spacing: tuple[float, float]) -> bytes:
    """One RGB PNG: the windowed flair in grey with the labels blended over it.

    Args:
        flair_slice: 2D intensities (rows, columns), display-oriented.
        label_slice: 2D BraTS labels of the same shape.
        grey_window: ``(low, high)`` intensities mapped to black and white.
        spacing: (row, column) pixel size in mm, used to make pixels square.

    Returns:
        PNG bytes.
    """
    if flair_slice.shape != label_slice.shape:
        raise ValueError(f"slice shapes differ: {flair_slice.shape} vs {label_slice.shape}")
    low, high = grey_window
    grey = np.clip((flair_slice.astype(np.float32) - low) / (high - low), 0.0, 1.0) * 255.0
    grey = _square_pixels(grey, spacing, cv2.INTER_LINEAR)
    labels = _square_pixels(label_slice.astype(np.uint8), spacing, cv2.INTER_NEAREST)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for label in BRATS_LABELS[1:]:
        where = labels == label
        if where.any():
            rgb[where] = (1.0 - OVERLAY_ALPHA) * rgb[where] + OVERLAY_ALPHA * np.asarray(LABEL_COLOURS[label])
    bgr = np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8)[..., ::-1])  # OpenCV writes BGR
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview as PNG")
    return encoded.tobytes()


def render_previews(flair: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                    spacing: Sequence[float], centre: Sequence[int] | None = None) -> dict[str, bytes]:
    """PNG previews in the three planes through the tumour (see the module docstring).

    Args:
        flair: ``(X, Y, Z)`` flair intensities in the file's voxel order.
        mask: ``(X, Y, Z)`` BraTS labels on the same grid.
        affine: the file's 4x4 affine (decides the orientation).
        spacing: voxel size in mm along the file's axes.
        centre: the point the planes go through, as voxel indices in the file's order; default
            :func:`tumour_centre` of ``mask`` (pass it when already computed, as the worker does).

    Returns:
        ``{"axial": png, "coronal": png, "sagittal": png}``.

    Raises:
        ValueError: the arrays are not 3D on one grid.
    """
    flair, mask = np.asarray(flair), np.asarray(mask)
    if flair.ndim != 3 or flair.shape != mask.shape:
        raise ValueError(f"flair and mask must be 3D on one grid, got {flair.shape} and {mask.shape}")
    flair_ras, _, orientation = to_ras(flair, affine)
    mask_ras, _, _ = to_ras(mask, affine)
    # row f of the orientation transform names the RAS axis that file axis f becomes
    spacing_ras = [0.0, 0.0, 0.0]
    for file_axis, (ras_axis, _) in enumerate(orientation.to_ras):
        spacing_ras[int(ras_axis)] = float(spacing[file_axis])
    grey_window = window(flair_ras)
    if centre is None:
        centre = tumour_centre(mask)
    point = [0, 0, 0]  # the same voxel in RAS+ order
    for file_axis, (ras_axis, flip) in enumerate(orientation.to_ras):
        size = mask.shape[file_axis]
        point[int(ras_axis)] = size - 1 - int(centre[file_axis]) if flip < 0 else int(centre[file_axis])
    flair_planes = plane_slices(flair_ras, point)
    label_planes = plane_slices(mask_ras, point)
    plane_mm = _plane_spacing(spacing_ras)
    return {plane: render_plane(flair_planes[plane], label_planes[plane], grey_window, plane_mm[plane])
            for plane in PLANES}
