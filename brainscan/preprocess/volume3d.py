"""Preprocessing of 4-modality brain MRI volumes for 3D segmentation, and its exact inverse.

One path for training and serving: :func:`preprocess_case` turns ``(C, X, Y, Z)`` channels into a
network input, :func:`crop_like` crops the training label map the same way, and
:func:`restore_to_original` puts a prediction back on the input grid voxel for voxel, using the
:class:`CropInfo` that preprocessing returned (JSON-able, so a worker may store it with the job).

Steps (BraTS volumes are skull-stripped, with exactly 0 outside the brain):

0. if ``orientation`` is set (e.g. ``"LPS"``, the voxel order of every BraTS case) and the caller
   gives the case's affine, the voxel axes are permuted and flipped into that order, so that a
   case stored sagittally or mirrored reaches the network as the training cases did;
1. brain mask = voxels where any channel is non-zero (all voxels if there are none);
2. per modality, z-score with mean/std over brain voxels, clipped to ``+-clip_zscore``,
   background set to 0;
3. crop to the brain bounding box (+ ``margin``, clamped to the volume);
4. if ``target_spacing`` is set, resample the crop to that voxel size (trilinear), e.g. 2 mm,
   which cuts the voxel count eightfold for a 1 mm BraTS case;
5. pad each spatial axis symmetrically with zeros up to a multiple of ``divisor`` (the network's
   total downsampling factor), and move channels last for Keras: ``(X', Y', Z', C)``.

Example:
    >>> x, info = preprocess_case(loaded.channels, VolumePreprocessConfig())
    >>> probs = model.predict(x[None])[0]                       # (X', Y', Z', 4)
    >>> probs = restore_to_original(probs, info, fill=(1, 0, 0, 0))  # (X, Y, Z, 4)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from brainscan.errors import BadDimensionsError, EmptyInputError, NonFiniteError
from brainscan.labels import MODALITIES, REGION_ORDER, regions_to_brats
from brainscan.preprocess.grid import (
    _reoriented_shape,
    brain_bounding_box,
    orientation_transform,
    reachable_box,
    reorient,
    resample,
    resample_linear_box,
    resampled_shape,
    undo_reorient,
)

# A brain region with (almost) constant intensity has no spread to divide by; dividing by 1 then
# maps it to 0 instead of to +-inf.
_MIN_STD = 1e-6


@dataclass
class VolumePreprocessConfig:
    """Parameters of :func:`preprocess_case`; stored in a model bundle's manifest.

    Attributes:
        divisor: every padded spatial size is a multiple of this (>= 1), e.g. 16 for a U-Net
            with four 2x downsamplings.
        clip_zscore: z-scores are clipped to ``[-clip_zscore, clip_zscore]`` (> 0).
        crop_to_brain: crop to the bounding box of non-zero voxels.
        margin: voxels kept around the brain bounding box on each side (>= 0).
        target_spacing: isotropic voxel size in mm that the network works at (> 0), or ``None``
            to keep the input grid. :func:`restore_to_original` resamples predictions back.
        orientation: three axis codes (nibabel's, e.g. ``"LPS"``) the voxel axes are brought to
            when the affine is known, or ``None`` to use the voxel order as stored.
    """

    divisor: int = 16
    clip_zscore: float = 5.0
    crop_to_brain: bool = True
    margin: int = 0
    target_spacing: float | None = None
    orientation: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.divisor, bool) or not isinstance(self.divisor, (int, np.integer)) or self.divisor < 1:
            raise ValueError(f"divisor must be an integer >= 1, got {self.divisor!r}")
        if isinstance(self.clip_zscore, bool) or not isinstance(self.clip_zscore, (int, float, np.number)):
            raise ValueError(f"clip_zscore must be a number > 0, got {self.clip_zscore!r}")
        if not (math.isfinite(self.clip_zscore) and self.clip_zscore > 0):
            raise ValueError(f"clip_zscore must be a finite number > 0, got {self.clip_zscore!r}")
        if not isinstance(self.crop_to_brain, (bool, np.bool_)):
            raise ValueError(f"crop_to_brain must be true or false, got {self.crop_to_brain!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, np.integer)) or self.margin < 0:
            raise ValueError(f"margin must be an integer >= 0, got {self.margin!r}")
        if self.target_spacing is not None:
            if isinstance(self.target_spacing, bool) or not isinstance(self.target_spacing, (int, float, np.number)) \
                    or not (math.isfinite(self.target_spacing) and self.target_spacing > 0):
                raise ValueError(f"target_spacing must be a finite number of mm > 0 or None, got {self.target_spacing!r}")
            self.target_spacing = float(self.target_spacing)
        if self.orientation is not None:
            codes = str(self.orientation).upper()
            pairs = ({"L", "R"}, {"A", "P"}, {"S", "I"})
            if len(codes) != 3 or sorted(next(i for i, p in enumerate(pairs) if c in p) if any(c in p for p in pairs)
                                         else -1 for c in codes) != [0, 1, 2]:
                raise ValueError(f"orientation must be 3 axis codes, one of L/R, A/P and S/I each (e.g. 'LPS'), "
                                 f"got {self.orientation!r}")
            self.orientation = codes
        self.divisor, self.margin = int(self.divisor), int(self.margin)
        self.clip_zscore, self.crop_to_brain = float(self.clip_zscore), bool(self.crop_to_brain)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("target_spacing", "orientation"):
            if d[key] is None:
                # manifests written before these options existed stay byte-identical
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumePreprocessConfig:
        """Build from a manifest dict; missing keys take defaults, unknown keys are an error.

        Raises:
            ValueError: unknown key or bad value (the message names it).
        """
        if not isinstance(d, dict):
            raise ValueError(f"volume preprocessing config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown volume preprocessing keys {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class CropInfo:
    """The geometry :func:`preprocess_case` applied, to undo it with :func:`restore_to_original`.

    Attributes:
        original_shape: spatial shape ``(X, Y, Z)`` of the input.
        crop: ``(start, stop)`` per spatial axis, into the original grid.
        pad: ``(before, after)`` zeros added per spatial axis after cropping (and resampling).
        resampled_shape: shape of the crop after resampling to the target spacing, or ``None``
            when the crop was not resampled.
        reorient: nibabel orientation transform ``((axis, flip), ...)`` applied to the input's
            voxel axes before cropping, or ``None``. ``crop`` indexes the reoriented grid.
    """

    original_shape: tuple[int, int, int]
    crop: tuple[tuple[int, int], ...]
    pad: tuple[tuple[int, int], ...]
    resampled_shape: tuple[int, int, int] | None = None
    reorient: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.reorient is not None:
            transform = tuple((int(a), int(f)) for a, f in self.reorient)
            if sorted(a for a, _ in transform) != [0, 1, 2] or any(f not in (-1, 1) for _, f in transform):
                raise ValueError(f"CropInfo reorient must permute axes 0-2 with flips +-1, got {self.reorient}")
            object.__setattr__(self, "reorient", None if transform == ((0, 1), (1, 1), (2, 1)) else transform)
        shape = tuple(int(s) for s in self.original_shape)
        crop = tuple((int(a), int(b)) for a, b in self.crop)
        pad = tuple((int(a), int(b)) for a, b in self.pad)
        if len(shape) != 3 or len(crop) != 3 or len(pad) != 3:
            raise ValueError(f"CropInfo needs 3 spatial axes, got shape {shape}, crop {crop}, pad {pad}")
        grid = shape if self.reorient is None else _reoriented_shape(shape, self.reorient)
        for axis, (size, (start, stop), (before, after)) in enumerate(zip(grid, crop, pad)):
            if not (size >= 1 and 0 <= start < stop <= size and before >= 0 and after >= 0):
                raise ValueError(
                    f"inconsistent CropInfo on axis {axis}: size {size}, crop {(start, stop)}, pad {(before, after)}"
                )
        if self.resampled_shape is not None:
            resampled = tuple(int(r) for r in self.resampled_shape)
            if len(resampled) != 3 or min(resampled) < 1:
                raise ValueError(f"CropInfo resampled_shape must be 3 positive sizes, got {self.resampled_shape}")
            object.__setattr__(self, "resampled_shape", resampled)
        object.__setattr__(self, "original_shape", shape)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "pad", pad)

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(stop - start for start, stop in self.crop)  # type: ignore[return-value]

    @property
    def reoriented_shape(self) -> tuple[int, int, int]:
        """Shape of the input after reorientation (the grid ``crop`` indexes)."""
        if self.reorient is None:
            return self.original_shape
        return _reoriented_shape(self.original_shape, self.reorient)

    @property
    def network_shape(self) -> tuple[int, int, int]:
        """Shape of the crop on the network's grid (after resampling, before padding)."""
        return self.resampled_shape if self.resampled_shape is not None else self.cropped_shape

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the network input ``(X', Y', Z')``."""
        return tuple(c + b + a for c, (b, a) in zip(self.network_shape, self.pad))  # type: ignore[return-value]

    @property
    def crop_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(start, stop) for start, stop in self.crop)  # type: ignore[return-value]

    @property
    def unpad_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(b, b + c) for c, (b, _) in zip(self.network_shape, self.pad))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, list]:
        d = {
            "original_shape": list(self.original_shape),
            "crop": [list(c) for c in self.crop],
            "pad": [list(p) for p in self.pad],
        }
        if self.resampled_shape is not None:
            d["resampled_shape"] = list(self.resampled_shape)
        if self.reorient is not None:
            d["reorient"] = [list(r) for r in self.reorient]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropInfo:
        """Inverse of :meth:`to_dict`. Raises ValueError on missing keys or inconsistent values."""
        try:
            resampled, reorient = d.get("resampled_shape"), d.get("reorient")
            return cls(original_shape=tuple(d["original_shape"]), crop=tuple(d["crop"]), pad=tuple(d["pad"]),
                       resampled_shape=tuple(resampled) if resampled is not None else None,
                       reorient=tuple(tuple(r) for r in reorient) if reorient is not None else None)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a CropInfo dict ({exc!r}): {d!r}") from exc


def _channel_name(index: int, n_channels: int) -> str:
    return MODALITIES[index] if n_channels == len(MODALITIES) else f"channel {index}"


def _pad_widths(shape: Sequence[int], divisor: int) -> tuple[tuple[int, int], ...]:
    widths = []
    for size in shape:
        total = -size % divisor
        widths.append((total // 2, total - total // 2))
    return tuple(widths)


def preprocess_case(
    channels: np.ndarray, config: VolumePreprocessConfig | None = None, spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
) -> tuple[np.ndarray, CropInfo]:
    """Normalise, crop, resample and pad one case for a 3D network.

    Args:
        channels: ``(C, X, Y, Z)`` intensities (for BraTS, C=4 in MODALITIES order), any real dtype.
        config: parameters; defaults to ``VolumePreprocessConfig()``.
        spacing: voxel size in mm per spatial axis (the NIfTI header's); ``None`` means 1 mm, the
            BraTS grid. Used only when ``config.target_spacing`` is set; taken from ``affine``
            when only that is given.
        affine: the case's voxel-to-world matrix (4x4); with ``config.orientation`` it decides how
            the voxel axes are reordered. ``None``: the voxel order as stored.

    Returns:
        ``(x, info)``: ``x`` float32 ``(X', Y', Z', C)`` (channels last), every ``X', Y', Z'`` a
        multiple of ``config.divisor``; ``info`` the :class:`CropInfo` to undo the geometry.

    Raises:
        BadDimensionsError: ``channels`` is not 4D.
        EmptyInputError: a dimension has size 0.
        NonFiniteError: NaN or infinite values (the message names the modality).
    """
    config = config or VolumePreprocessConfig()
    channels = np.asarray(channels)
    if channels.ndim != 4:
        raise BadDimensionsError(f"channels must be (C, X, Y, Z), got shape {channels.shape}")
    if 0 in channels.shape:
        raise EmptyInputError(f"channels have an empty dimension: shape {channels.shape}")
    n_channels = channels.shape[0]
    for index in range(n_channels):
        if not np.isfinite(channels[index]).all():
            raise NonFiniteError(f"{_channel_name(index, n_channels)} holds NaN or infinite values")

    transform = None
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise BadDimensionsError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
        if spacing is None:
            spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        if config.orientation is not None:
            transform = orientation_transform(affine, config.orientation)
            if transform == ((0, 1), (1, 1), (2, 1)):
                transform = None
    original_shape = tuple(channels.shape[1:])
    if transform is not None:
        channels = np.stack([reorient(c, transform) for c in channels])
        if spacing is not None:
            permuted = [0.0, 0.0, 0.0]
            for axis, (target, _) in enumerate(transform):
                permuted[target] = float(tuple(spacing)[axis])
            spacing = tuple(permuted)
    mask = channels[0] != 0
    for channel in channels[1:]:
        mask |= channel != 0
    if config.crop_to_brain:
        crop = brain_bounding_box(mask, config.margin)
    else:
        crop = tuple((0, int(s)) for s in mask.shape)
    box = tuple(slice(a, b) for a, b in crop)
    # Every brain voxel lies inside the box, so statistics on the cropped arrays are the same.
    mask = mask[box]
    cropped = channels[(slice(None), *box)]

    network_shape = None
    if config.target_spacing is not None:
        spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)[:3]
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise BadDimensionsError(f"voxel spacing must be 3 positive sizes in mm, got {spacing}")
        network_shape = resampled_shape(mask.shape, spacing, config.target_spacing)
    shape = network_shape or mask.shape
    pad = _pad_widths(shape, config.divisor)
    out = np.zeros((*(n + a + b for n, (a, b) in zip(shape, pad)), n_channels), dtype=np.float32)
    inner = tuple(slice(a, a + n) for n, (a, _) in zip(shape, pad))
    brain = mask.any()
    for index in range(n_channels):
        channel = cropped[index]
        # in the channel's memory order (NIfTI arrays are Fortran-ordered): mixing orders is slow
        z = np.zeros_like(channel, dtype=np.float32)
        if brain:
            # z-score over the brain in float32 (the statistics in float64), 0 outside it
            voxels = channel.T[mask.T]  # gathered in memory order
            mean, std = voxels.mean(dtype=np.float64), voxels.std(dtype=np.float64)
            np.subtract(channel, np.float32(mean), out=z, casting="unsafe")
            z *= np.float32(1.0 / (std if std > _MIN_STD else 1.0))
            np.clip(z, -config.clip_zscore, config.clip_zscore, out=z)
            z *= mask
        out[(*inner, index)] = z if network_shape is None else resample(z, network_shape, order=1)
    info = CropInfo(original_shape=original_shape, crop=crop, pad=pad, resampled_shape=network_shape,
                    reorient=transform)
    return out, info


def _check_spatial(array: np.ndarray, expected: tuple[int, ...], what: str) -> None:
    if array.ndim not in (3, 4) or tuple(array.shape[:3]) != tuple(expected):
        raise BadDimensionsError(
            f"{what} has shape {array.shape}; expected spatial shape {tuple(expected)} "
            "optionally followed by a channel axis"
        )


def crop_like(seg: np.ndarray, info: CropInfo, order: int = 0) -> np.ndarray:
    """Crop and pad a label map (or any ``(X, Y, Z[, K])`` array) exactly as the image was.

    Args:
        seg: array on the original grid, ``(X, Y, Z)`` or ``(X, Y, Z, K)``; dtype is kept.
        info: from :func:`preprocess_case` on the same case.
        order: interpolation where the case is resampled: 0 (nearest: labels), or 1 (trilinear, for
            a float array: region masks become each coarse voxel's fraction of the region).

    Returns:
        ``(X', Y', Z'[, K])`` aligned voxel for voxel with the network input; padding is 0.

    Raises:
        BadDimensionsError: ``seg`` is not on the original grid.
    """
    seg = np.asarray(seg)
    if order not in (0, 1) or (order == 1 and not np.issubdtype(seg.dtype, np.floating)):
        raise ValueError(f"order must be 0, or 1 for a float array; got {order} for {seg.dtype}")
    _check_spatial(seg, info.original_shape, "label map")
    extra = ((0, 0),) * (seg.ndim - 3)
    cropped = reorient(seg, info.reorient)[info.crop_slices]
    if info.resampled_shape is not None:
        cropped = resample(cropped, info.resampled_shape, order=order)
    return np.pad(cropped, (*info.pad, *extra))


def restore_to_original(
    pred: np.ndarray, info: CropInfo, fill: float | Sequence[float] = 0
) -> np.ndarray:
    """Put a prediction on the network grid back on the original grid (exact inverse geometry).

    Args:
        pred: ``(X', Y', Z')`` labels or ``(X', Y', Z', K)`` probabilities on the padded grid.
        info: from :func:`preprocess_case`.
        fill: value outside the crop box: a scalar, or for ``(.., K)`` inputs one value per
            channel. For probability maps pass e.g. ``(1, 0, 0, 0)`` so background wins the
            argmax outside the brain (a scalar 0 leaves ties there, which argmax resolves to class 0).

    Returns:
        ``(X, Y, Z[, K])`` with ``pred``'s dtype.

    Raises:
        BadDimensionsError: ``pred`` does not have the padded shape, or ``fill`` does not match K.
    """
    pred = np.asarray(pred)
    _check_spatial(pred, info.padded_shape, "prediction")
    fill_values = np.asarray(fill, dtype=pred.dtype)
    if fill_values.ndim > 1 or (fill_values.ndim == 1 and (pred.ndim != 4 or fill_values.size != pred.shape[3])):
        raise BadDimensionsError(
            f"fill must be a scalar or one value per channel ({pred.shape[3:] or 'no channel axis'}), got {fill!r}"
        )
    inner = pred[info.unpad_slices]
    if info.resampled_shape is not None:
        # Probabilities are interpolated (trilinear); labels take the nearest network voxel.
        floating = np.issubdtype(pred.dtype, np.floating)
        inner = resample(inner, info.cropped_shape, order=1 if floating else 0).astype(pred.dtype, copy=False)
    out = np.empty(info.reoriented_shape + pred.shape[3:], dtype=pred.dtype)
    out[...] = fill_values
    out[info.crop_slices] = inner
    return np.ascontiguousarray(undo_reorient(out, info.reorient))


def restore_regions(probabilities: np.ndarray, info: CropInfo, threshold: float = 0.5) -> np.ndarray:
    """Region probabilities ``(X', Y', Z', 3)`` (WT, TC, ET) on the padded network grid -> BraTS labels
    ``(X, Y, Z)`` uint8 on the original grid: ``regions_to_brats(restore_to_original(probabilities, info,
    fill=0.0), threshold)``, computed only where a label can be.

    A trilinear voxel is a weighted mean of its network neighbours, so it passes ``threshold`` only
    next to a network voxel that does; every label needs whole tumour (the regions are nested). The
    probabilities are therefore interpolated only over the output voxels that read the box of network
    voxels with whole tumour above ``threshold`` (a tenth of a brain crop, typically), and the rest of
    the grid is background.

    Raises:
        BadDimensionsError: ``probabilities`` is not ``(*padded_shape, 3)``.
        ValueError: ``threshold`` outside (0, 1).
    """
    probabilities = np.asarray(probabilities)
    _check_spatial(probabilities, info.padded_shape, "region probabilities")
    if probabilities.ndim != 4 or probabilities.shape[3] != len(REGION_ORDER):
        raise BadDimensionsError(f"region probabilities need {len(REGION_ORDER)} channels {REGION_ORDER}, "
                                 f"got shape {probabilities.shape}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if info.resampled_shape is None:  # same grid: nothing to interpolate
        return restore_to_original(regions_to_brats(probabilities, threshold), info, fill=0)
    inner = probabilities[info.unpad_slices]
    labels = np.zeros(info.cropped_shape, dtype=np.uint8)
    whole = inner[..., 0] > threshold
    if whole.any():
        box = reachable_box(brain_bounding_box(whole), whole.shape, info.cropped_shape)
        part = resample_linear_box(inner, info.cropped_shape, box)
        labels[tuple(slice(a, b) for a, b in box)] = regions_to_brats(part, threshold)
    out = np.zeros(info.reoriented_shape, dtype=np.uint8)
    out[info.crop_slices] = labels
    return np.ascontiguousarray(undo_reorient(out, info.reorient))


__all__ = [
    "CropInfo", "VolumePreprocessConfig", "brain_bounding_box", "crop_like", "orientation_transform",
    "preprocess_case", "reorient", "resample", "resampled_shape", "restore_regions", "restore_to_original",
    "undo_reorient",
]
