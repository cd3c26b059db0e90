"""Lesions of the Kaggle-layout phantoms (:mod:`brainscan.data.phantoms.kaggle`): a lesion's section
in a slice, the mass effect it has on the tissue around it, and how it is painted per contrast
(partial-volume edges, texture, ring enhancement, necrosis, edema, a meningioma's CSF cleft and dural
tail).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from brainscan.data.phantoms.anatomy import smooth_noise_2d

# Lesion signal per contrast on the scale of kaggle._CONTRASTS ("ring": enhancing glioma on post-contrast T1).
_LESION_SIGNAL: dict[str, dict[str, float]] = {
    "ring": {"t1": 1.35, "t2": 0.75, "flair": 0.85},
    "glioma": {"t1": 0.62, "t2": 0.75, "flair": 0.85},
    "necrosis": {"t1": 0.30, "t2": 0.95, "flair": 0.30},
    "edema_cap": {"t1": 1.0, "t2": 0.90, "flair": 1.05},
    "meningioma": {"t1": 1.30, "t2": 0.62, "flair": 0.72},
    "pituitary": {"t1": 1.05, "t2": 0.62, "flair": 0.70},
    "gland": {"t1": 0.95, "t2": 0.55, "flair": 0.60},
}
_EDEMA_GAIN = {"t1": 0.82, "t2": 2.0, "flair": 1.8}


@dataclass(frozen=True)
class _Lesion:
    """A lesion's section in a canvas: centre ``(row, col)`` and radius in pixels (= mm)."""

    kind: str  # "glioma", "meningioma", "pituitary" or "gland" (the normal pituitary)
    centre: tuple[float, float]
    radius: float
    elongation: float = 1.0
    angle: float = 0.0
    push: float = 0.0  # mass effect: 1 pushes the tissue at the centre out to the lesion's edge


def _blob(
    rng: np.random.Generator, shape: tuple[int, int], lesion: _Lesion, scale: float, roughness: float
) -> np.ndarray:
    """Normalised distance to the lesion centre (1 at its edge) with a smoothly irregular outline."""
    rows, cols = np.indices(shape, dtype=np.float32)
    dr, dc = rows - lesion.centre[0], cols - lesion.centre[1]
    cos, sin = np.cos(lesion.angle), np.sin(lesion.angle)
    along, across = cos * dr + sin * dc, -sin * dr + cos * dc
    radius = lesion.radius * scale
    distance = np.sqrt((along / (radius * lesion.elongation)) ** 2 + (across / radius) ** 2)
    if roughness > 0:
        cells = max(4, int(shape[0] / max(radius, 4.0)))  # about one bump per radius
        distance += roughness * np.clip(smooth_noise_2d(rng, shape, cells), -2, 2)
    return distance


def _push_tissue(channels: dict[str, np.ndarray], lesion: _Lesion, hull: np.ndarray) -> dict[str, np.ndarray]:
    """Mass effect: move brain tissue radially away from the lesion (the skull stays where it is)."""
    if lesion.push <= 0:
        return channels
    shape = hull.shape
    rows, cols = np.indices(shape, dtype=np.float32)
    dr, dc = rows - lesion.centre[0], cols - lesion.centre[1]
    distance = np.sqrt(dr * dr + dc * dc) + 1e-3
    r = lesion.radius
    falloff = np.where(distance <= r, 1.0, np.exp(-(((distance - r) / (1.5 * r)) ** 2)))
    # The output pixel at `distance` shows the tissue from `source`: monotonic, so nothing folds.
    source = np.maximum(distance - lesion.push * r * falloff, 0.0) / distance
    map_x = (lesion.centre[1] + dc * source).astype(np.float32)
    map_y = (lesion.centre[0] + dr * source).astype(np.float32)
    return {
        key: cv2.remap(value, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT) * hull
        for key, value in channels.items()
    }


def _paint(
    rng: np.random.Generator,
    canvas: np.ndarray,
    lesion: _Lesion,
    channels: dict[str, np.ndarray],
    hull: np.ndarray,
    tissue: dict[str, float],
    contrast: str,
) -> np.ndarray:
    """Draw a lesion into a rendered canvas with soft (partial-volume) edges."""
    shape = canvas.shape
    signal = {k: v[contrast] * rng.uniform(0.85, 1.15) for k, v in _LESION_SIGNAL.items()}
    texture = 1.0 + rng.uniform(0.04, 0.15) * smooth_noise_2d(rng, shape, 24)

    def soft(mask: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.8)

    def blend(image: np.ndarray, weight: np.ndarray, value: np.ndarray | float) -> np.ndarray:
        return image * (1.0 - weight) + weight * value

    if lesion.kind == "glioma":
        mass = _blob(rng, shape, lesion, 1.0, 0.22) < 1.0
        edema = (_blob(rng, shape, lesion, rng.uniform(1.4, 2.0), 0.35) - 0.3 * (channels["wm"] - 0.5) < 1.0)
        edema &= (channels["brain"] > 0.5) & ~mass
        edema_value = np.minimum(canvas * _EDEMA_GAIN[contrast], signal["edema_cap"])
        canvas = blend(canvas, soft(edema), edema_value * texture)
        enhancing = contrast == "t1" and rng.random() < 0.65
        canvas = blend(canvas, soft(mass), (signal["ring"] if enhancing else signal["glioma"]) * texture)
        if rng.random() < 0.65:
            core = _blob(rng, shape, lesion, rng.uniform(0.35, 0.65), 0.2) < 1.0
            core &= cv2.erode(mass.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            canvas = blend(canvas, soft(core), signal["necrosis"] * texture)
        return canvas
    distance = _blob(rng, shape, lesion, 1.0, 0.04 if lesion.kind != "pituitary" else 0.08)
    if lesion.kind == "meningioma":
        # A thin CSF cleft separates the extra-axial mass from the cortex it pushes.
        cleft = (distance >= 1.0) & (distance < 1.0 + 1.5 / lesion.radius) & (hull > 0.5)
        canvas = blend(canvas, soft(cleft), tissue["csf"])
        if contrast == "t1" and rng.random() < 0.5:
            inside_depth = cv2.distanceTransform((hull > 0.5).astype(np.uint8), cv2.DIST_L2, 5)
            tail = (inside_depth > 0) & (inside_depth < 1.5) & (distance < 1.9) & (distance >= 1.0)
            canvas = blend(canvas, soft(tail) * np.clip(2.0 - distance, 0, 1), signal["meningioma"])
    return blend(canvas, soft(distance < 1.0), signal[lesion.kind] * texture)
