"""Voxel-grid operations shared by 3D preprocessing and its inverse: reorienting voxel axes to an
orientation code (and back), the brain's bounding box, and resampling to a voxel size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _reoriented_shape(shape: Sequence[int], transform: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(transform):
        out[int(target)] = int(shape[axis])
    return tuple(out)  # type: ignore[return-value]


def orientation_transform(affine: np.ndarray, orientation: str) -> tuple[tuple[int, int], ...]:
    """The nibabel transform taking voxel axes of ``affine`` to the axis codes ``orientation``."""
    from nibabel import orientations

    transform = orientations.ornt_transform(orientations.io_orientation(np.asarray(affine)),
                                            orientations.axcodes2ornt(tuple(orientation)))
    return tuple((int(a), int(f)) for a, f in transform)


def reorient(array: np.ndarray, transform: Sequence[Sequence[int]] | None) -> np.ndarray:
    """Apply an orientation transform to the 3 leading (spatial) axes of ``array``."""
    if transform is None:
        return array
    from nibabel import orientations

    return orientations.apply_orientation(array, np.asarray(transform, dtype=np.float64))


def undo_reorient(array: np.ndarray, transform: Sequence[Sequence[int]] | None) -> np.ndarray:
    """Inverse of :func:`reorient` with the same ``transform``."""
    if transform is None:
        return array
    from nibabel import orientations

    # transform[i] = (j, flip): input axis i became axis j; so axis j goes back to i, flipped alike.
    inverse = np.zeros((3, 2), dtype=np.float64)
    for axis, (target, flip) in enumerate(transform):
        inverse[int(target)] = (axis, flip)
    return orientations.apply_orientation(array, inverse)


def brain_bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per axis of the non-zero voxels of ``mask``, widened by ``margin``
    and clamped to the array; the whole array if ``mask`` is empty."""
    if not mask.any():
        return tuple((0, int(s)) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: float) -> tuple[int, int, int]:
    """Voxel counts of a ``shape`` grid of ``spacing`` mm voxels resampled to ``target_spacing`` mm."""
    return tuple(max(1, int(round(n * s / target_spacing))) for n, s in zip(shape, spacing))  # type: ignore[return-value]


def resample(array: np.ndarray, shape: Sequence[int], *, order: int) -> np.ndarray:
    """Resample ``(X, Y, Z[, K])`` to spatial ``shape`` (voxel edges aligned: each voxel is a cell).

    Args:
        array: the volume; a channel axis, if any, is resampled channel by channel.
        shape: target spatial shape.
        order: 0 nearest (labels, keeps the dtype), 1 trilinear (intensities, probabilities: float32).

    Returns:
        ``(*shape[, K])``.
    """
    from scipy import ndimage

    shape = tuple(int(n) for n in shape)
    if tuple(array.shape[:3]) == shape:
        return array if order == 0 else np.asarray(array, dtype=np.float32)
    zoom = [n / o for n, o in zip(shape, array.shape[:3])]
    if order == 0:
        # Nearest neighbour by index: the cell centre of each output voxel, mapped to the input grid.
        index = [np.minimum(((np.arange(n) + 0.5) / z).astype(np.int64), o - 1)
                 for n, z, o in zip(shape, zoom, array.shape[:3])]
        return array[np.ix_(*index)]
    source = np.asarray(array, dtype=np.float32)
    if source.ndim == 3 and source.flags.f_contiguous and not source.flags.c_contiguous:
        # ndimage walks C order: a Fortran-ordered volume (NIfTI's) goes through its transpose, twice as fast
        return resample(source.T, shape[::-1], order=1).T
    if source.ndim == 3:
        return ndimage.zoom(source, zoom, order=1, mode="nearest", grid_mode=True)[tuple(slice(0, n) for n in shape)]
    out = np.empty((*shape, source.shape[3]), dtype=np.float32)
    for k in range(source.shape[3]):
        out[..., k] = ndimage.zoom(source[..., k], zoom, order=1, mode="nearest", grid_mode=True)[
            tuple(slice(0, n) for n in shape)]
    return out


def linear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output voxel of one axis: the two input voxels and the weight of the second, for linear
    interpolation with voxel edges aligned and edge values repeated (:func:`resample`'s ``order=1``,
    that is ``ndimage.zoom(..., order=1, mode="nearest", grid_mode=True)``).

    Returns:
        ``(low, high, weight)``, each ``(n_out,)``: output ``j`` is ``(1 - weight[j]) * x[low[j]] +
        weight[j] * x[high[j]]``; ``low <= high <= low + 1``.
    """
    position = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    low = np.minimum(np.floor(position).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, position - low


def resample_linear_box(array: np.ndarray, shape: Sequence[int],
                        box: Sequence[tuple[int, int]]) -> np.ndarray:
    """The ``box`` (``(start, stop)`` per axis, on the output grid) of ``resample(array, shape, order=1)``,
    computed without the rest: axis by axis, in float64, from the input voxels that box needs.

    Args:
        array: ``(X, Y, Z[, K])``.
        shape: the whole output's spatial shape.
        box: the part of the output wanted.

    Returns:
        float32 ``(stop - start per axis[, K])``; the same values as the whole resample's (to float32 rounding).
    """
    out = np.asarray(array)
    for axis, ((start, stop), n_out) in enumerate(zip(box, shape)):
        low, high, weight = linear_taps(int(n_out), out.shape[axis])
        low, high, weight = low[start:stop], high[start:stop], weight[start:stop]
        first = int(low.min()) if low.size else 0
        window = np.take(out, np.arange(first, int(high.max()) + 1 if high.size else first), axis=axis).astype(
            np.float64, copy=False)
        view = [1] * window.ndim
        view[axis] = -1
        w = weight.reshape(view)
        out = np.take(window, low - first, axis=axis) * (1.0 - w) + np.take(window, high - first, axis=axis) * w
    return out.astype(np.float32)


def reachable_box(box: Sequence[tuple[int, int]], in_shape: Sequence[int],
                  out_shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The output voxels of a linear resample (:func:`resample` ``order=1``) from ``in_shape`` to
    ``out_shape`` that read an input voxel inside ``box``: every other output voxel is a weighted
    mean of input voxels outside it. ``(start, stop)`` per axis, possibly empty (``start == stop``)."""
    reached = []
    for (start, stop), n_in, n_out in zip(box, in_shape, out_shape):
        low, high, _ = linear_taps(int(n_out), int(n_in))
        hits = np.flatnonzero((high >= start) & (low < stop))
        reached.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, 0))
    return tuple(reached)


__all__ = ["brain_bounding_box", "linear_taps", "orientation_transform", "reachable_box", "reorient", "resample",
           "resample_linear_box", "resampled_shape", "undo_reorient"]
