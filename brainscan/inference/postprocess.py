"""Post-processing of BraTS label maps that the field uses, each switchable from the manifest.

Two steps, applied in this order by :func:`postprocess_labels`:

1. ``min_component_mm3``: connected components of the whole tumour (26-connectivity) smaller
   than this volume are removed (isolated false-positive specks far from the tumour);
2. ``min_enhancing_mm3``: when the enhancing tumour of the whole case is smaller than this volume,
   it becomes necrotic / non-enhancing core (label 4 -> 1). Low-grade gliomas often have no
   enhancing tumour at all, and BraTS scores a single false ET voxel on such a case as Dice 0;
   nnU-Net's BraTS entries do the same.

Both default to 0 (off). A bundle records the values its validation chose in the manifest's
``inference.postprocessing`` section, and every path (evaluate, predict, the worker, training
validation) applies them through :class:`brainscan.inference.segmenter.Segmenter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PostprocessConfig:
    """Manifest ``inference.postprocessing``.

    Attributes:
        threshold: region probability above which a voxel is in the region (region outputs only).
        min_component_mm3: whole-tumour components below this volume are dropped (0: off).
        min_enhancing_mm3: a case's enhancing tumour below this volume becomes core (0: off).
    """

    threshold: float = 0.5
    min_component_mm3: float = 0.0
    min_enhancing_mm3: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"postprocessing threshold must be in (0, 1), got {self.threshold}")
        for name in ("min_component_mm3", "min_enhancing_mm3"):
            value = float(getattr(self, name))
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"postprocessing {name} must be a finite volume >= 0 mm^3, got {value}")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PostprocessConfig:
        """Build from a manifest section (``None``: defaults). Raises ValueError on unknown keys."""
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown postprocessing keys {unknown}")
        return cls(**{k: float(v) for k, v in d.items()})


def _voxel_mm3(spacing: Sequence[float] | None) -> float:
    if spacing is None:
        return 1.0
    return float(np.prod([float(s) for s in tuple(spacing)[:3]]))


def remove_small_components(labels: np.ndarray, min_mm3: float, spacing: Sequence[float] | None) -> np.ndarray:
    """Zero the whole-tumour components (26-connected) smaller than ``min_mm3``; returns a copy."""
    from scipy import ndimage

    labels = np.array(labels, copy=True)
    if min_mm3 <= 0 or not labels.any():
        return labels
    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1) * _voxel_mm3(spacing)
    small = sizes < min_mm3
    small[0] = False
    labels[small[components]] = 0
    return labels


def relabel_small_enhancing(labels: np.ndarray, min_mm3: float, spacing: Sequence[float] | None) -> np.ndarray:
    """Turn all enhancing tumour (4) into core (1) when its total volume is below ``min_mm3``."""
    labels = np.array(labels, copy=True)
    enhancing = labels == 4
    if min_mm3 > 0 and 0 < enhancing.sum() * _voxel_mm3(spacing) < min_mm3:
        labels[enhancing] = 1
    return labels


def postprocess_labels(labels: np.ndarray, config: PostprocessConfig, spacing: Sequence[float] | None) -> np.ndarray:
    """Apply the steps of ``config`` to a BraTS label map ``(X, Y, Z)`` with voxel ``spacing`` mm."""
    labels = remove_small_components(labels, config.min_component_mm3, spacing)
    return relabel_small_enhancing(labels, config.min_enhancing_mm3, spacing)


__all__ = ["PostprocessConfig", "postprocess_labels", "relabel_small_enhancing", "remove_small_components"]
