"""Preprocessing of 4-modality brain MRI volumes for 3D segmentation, and its exact inverse.

One path for training and serving: :func:`preprocess_case` turns ``(C, X, Y, Z)`` channels into a
network input, :func:`crop_like` crops the training label map the same way, and
:func:`restore_to_original` puts a prediction back on the input grid voxel for voxel, using the
:class:`CropInfo` that preprocessing returned (JSON-able, so a worker may store it with the job).

Steps (BraTS volumes are skull-stripped, with exactly 0 outside the brain):

1. brain mask = voxels where any channel is non-zero (all voxels if there are none);
2. per modality, z-score with mean/std over brain voxels, clipped to ``+-clip_zscore``,
   background set to 0;
3. crop to the brain bounding box (+ ``margin``, clamped to the volume);
4. pad each spatial axis symmetrically with zeros up to a multiple of ``divisor`` (the network's
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
from brainscan.labels import MODALITIES

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
    """

    divisor: int = 16
    clip_zscore: float = 5.0
    crop_to_brain: bool = True
    margin: int = 0

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
        self.divisor, self.margin = int(self.divisor), int(self.margin)
        self.clip_zscore, self.crop_to_brain = float(self.clip_zscore), bool(self.crop_to_brain)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        pad: ``(before, after)`` zeros added per spatial axis after cropping.
    """

    original_shape: tuple[int, int, int]
    crop: tuple[tuple[int, int], ...]
    pad: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.original_shape)
        crop = tuple((int(a), int(b)) for a, b in self.crop)
        pad = tuple((int(a), int(b)) for a, b in self.pad)
        if len(shape) != 3 or len(crop) != 3 or len(pad) != 3:
            raise ValueError(f"CropInfo needs 3 spatial axes, got shape {shape}, crop {crop}, pad {pad}")
        for axis, (size, (start, stop), (before, after)) in enumerate(zip(shape, crop, pad)):
            if not (size >= 1 and 0 <= start < stop <= size and before >= 0 and after >= 0):
                raise ValueError(
                    f"inconsistent CropInfo on axis {axis}: size {size}, crop {(start, stop)}, pad {(before, after)}"
                )
        object.__setattr__(self, "original_shape", shape)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "pad", pad)

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(stop - start for start, stop in self.crop)  # type: ignore[return-value]

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the network input ``(X', Y', Z')``."""
        return tuple(c + b + a for c, (b, a) in zip(self.cropped_shape, self.pad))  # type: ignore[return-value]

    @property
    def crop_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(start, stop) for start, stop in self.crop)  # type: ignore[return-value]

    @property
    def unpad_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(b, b + c) for c, (b, _) in zip(self.cropped_shape, self.pad))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, list]:
        return {
            "original_shape": list(self.original_shape),
            "crop": [list(c) for c in self.crop],
            "pad": [list(p) for p in self.pad],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropInfo:
        """Inverse of :meth:`to_dict`. Raises ValueError on missing keys or inconsistent values."""
        try:
            return cls(original_shape=tuple(d["original_shape"]), crop=tuple(d["crop"]), pad=tuple(d["pad"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a CropInfo dict ({exc!r}): {d!r}") from exc


def _channel_name(index: int, n_channels: int) -> str:
    return MODALITIES[index] if n_channels == len(MODALITIES) else f"channel {index}"


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


def _pad_widths(shape: Sequence[int], divisor: int) -> tuple[tuple[int, int], ...]:
    widths = []
    for size in shape:
        total = -size % divisor
        widths.append((total // 2, total - total // 2))
    return tuple(widths)


def preprocess_case(
    channels: np.ndarray, config: VolumePreprocessConfig | None = None
) -> tuple[np.ndarray, CropInfo]:
    """Normalise, crop and pad one case for a 3D network.

    Args:
        channels: ``(C, X, Y, Z)`` intensities (for BraTS, C=4 in MODALITIES order), any real dtype.
        config: parameters; defaults to ``VolumePreprocessConfig()``.

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

    mask = np.any(channels != 0, axis=0)
    if config.crop_to_brain:
        crop = brain_bounding_box(mask, config.margin)
    else:
        crop = tuple((0, int(s)) for s in mask.shape)
    box = tuple(slice(a, b) for a, b in crop)
    # Every brain voxel lies inside the box, so statistics on the cropped arrays are the same.
    mask = mask[box]
    cropped = channels[(slice(None), *box)]

    out = np.zeros(cropped.shape, dtype=np.float32)
    if mask.any():
        for index in range(n_channels):
            brain = cropped[index][mask].astype(np.float64)
            mean, std = brain.mean(), brain.std()
            z = (cropped[index].astype(np.float64) - mean) / (std if std > _MIN_STD else 1.0)
            np.clip(z, -config.clip_zscore, config.clip_zscore, out=z)
            out[index][mask] = z[mask]

    pad = _pad_widths(out.shape[1:], config.divisor)
    out = np.pad(out, ((0, 0), *pad))
    info = CropInfo(original_shape=tuple(channels.shape[1:]), crop=crop, pad=pad)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1)), info


def _check_spatial(array: np.ndarray, expected: tuple[int, ...], what: str) -> None:
    if array.ndim not in (3, 4) or tuple(array.shape[:3]) != tuple(expected):
        raise BadDimensionsError(
            f"{what} has shape {array.shape}; expected spatial shape {tuple(expected)} "
            "optionally followed by a channel axis"
        )


def crop_like(seg: np.ndarray, info: CropInfo) -> np.ndarray:
    """Crop and pad a label map (or any ``(X, Y, Z[, K])`` array) exactly as the image was.

    Args:
        seg: array on the original grid, ``(X, Y, Z)`` or ``(X, Y, Z, K)``; dtype is kept.
        info: from :func:`preprocess_case` on the same case.

    Returns:
        ``(X', Y', Z'[, K])`` aligned voxel for voxel with the network input; padding is 0.

    Raises:
        BadDimensionsError: ``seg`` is not on the original grid.
    """
    seg = np.asarray(seg)
    _check_spatial(seg, info.original_shape, "label map")
    extra = ((0, 0),) * (seg.ndim - 3)
    return np.pad(seg[info.crop_slices], (*info.pad, *extra))


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
    out = np.empty(info.original_shape + pred.shape[3:], dtype=pred.dtype)
    out[...] = fill_values
    out[info.crop_slices] = pred[info.unpad_slices]
    return out


__all__ = [
    "CropInfo", "VolumePreprocessConfig", "brain_bounding_box", "crop_like", "preprocess_case",
    "restore_to_original",
]
