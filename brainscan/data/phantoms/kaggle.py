"""Synthetic 2D slices in the layout of the Kaggle "Brain Tumor MRI Dataset" (four classes).

Each image is a slice of the MNI ICBM152 brain (axial mostly, else coronal or sagittal) with a
synthetic skull and scalp, in T1-, T2- or FLAIR-like contrast, at a random slice position, angle,
zoom and black border, with bias field, noise and a random intensity window. The classes differ the
way the real ones do:

- glioma: irregular intra-axial mass in the white matter, often ring-enhancing around a necrotic
  centre, with an edema halo and mild mass effect;
- meningioma: round, sharply outlined, avidly enhancing extra-axial mass on the dura (convexity or
  falx) that pushes the cortex away, sometimes with a dural tail;
- pituitary: small round mass at the sella turcica, in the midline at the skull base;
- notumor: a plain slice.

Every slice through the sella also shows a normal pituitary gland, and the window and gain are
random per image, so neither "something at the sella" nor total brightness gives the class away.

Example:
    >>> root = write_kaggle_phantoms("/tmp/kaggle", n=40, seed=0)   # /tmp/kaggle/Training
    >>> image, info = make_kaggle_phantom_with_info("pituitary", seed=3)
    >>> abs(info.lesion_mm[0]) < 3                                  # on the midline
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from brainscan.data.phantoms.anatomy import (
    MNI_TEMPLATE_NOTICE,
    TemplateSlicer,
    load_template,
    seeded_rng,
    slice_ranges,
    smooth_noise_2d,
)
from brainscan.data.phantoms.lesions import _Lesion, _paint, _push_tissue
from brainscan.labels import KAGGLE_CLASSES

#: File name prefixes of the real dataset: ``Tr-gl_0001.jpg``, ``Te-pi_0042.jpg``.
CLASS_CODES: dict[str, str] = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}
SPLIT_CODES: dict[str, str] = {"Training": "Tr", "Testing": "Te"}
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
_JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_OPTIMIZE, 0, cv2.IMWRITE_JPEG_PROGRESSIVE, 0]
# Signal of each tissue per contrast (T1 white matter = 1).
# "gap": inside the skull but outside this brain section (sulci, skull base).
_TISSUES = ("wm", "gm", "csf", "bone", "diploe", "muscle", "fat", "gap")
_CONTRASTS: dict[str, dict[str, float]] = {
    "t1": dict(zip(_TISSUES, (1.0, 0.74, 0.28, 0.05, 0.62, 0.40, 0.95, 0.30))),
    "t2": dict(zip(_TISSUES, (0.35, 0.58, 1.00, 0.04, 0.40, 0.22, 0.65, 0.45))),
    "flair": dict(zip(_TISSUES, (0.50, 0.68, 0.10, 0.04, 0.45, 0.30, 0.75, 0.20))),
}
_CONTRAST_PROBS = {"t1": 0.6, "t2": 0.25, "flair": 0.15}
# Pituitary adenomas are mostly imaged coronal/sagittal; the other classes mostly axial.
_PLANE_PROBS = {"pituitary": (0.4, 0.3, 0.3), "default": (0.7, 0.15, 0.15)}
# Shell around the brain, outward: (outer edge in mm before the random thickness factor, tissue).
_SHELL = ((1.5, "csf"), (3.0, "bone"), (6.5, "diploe"), (8.0, "bone"), (9.5, "muscle"), (14.0, "fat"))
#: Centre of the sella turcica / pituitary gland in MNI millimetres, and the normal gland's radii.
SELLA_MM = np.array([0.0, 0.0, -36.0])
_GLAND_RADII_MM = (6.0, 5.0, 3.5)


@dataclass(frozen=True)
class KagglePhantomInfo:
    """How one synthetic Kaggle image was made (for tests and sanity checks).

    Attributes:
        label: class name.
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        slice_mm: MNI coordinate of the slice along its normal (z, y or x), millimetres.
        contrast: ``"t1"`` (post-contrast-like), ``"t2"`` or ``"flair"``.
        lesion_mm: MNI ``(x, y, z)`` of the lesion centre, ``None`` for notumor.
        lesion_radius_mm: in-plane lesion radius, ``None`` for notumor.
        lesion_px: ``(row, col)`` of the lesion centre in the output image, ``None`` for notumor.
        lesion_radius_px: lesion radius in output pixels, ``None`` for notumor.
    """

    label: str
    plane: str
    slice_mm: float
    contrast: str
    lesion_mm: tuple[float, float, float] | None
    lesion_radius_mm: float | None
    lesion_px: tuple[float, float] | None
    lesion_radius_px: float | None


def _check_label(label: str) -> None:
    if label not in KAGGLE_CLASSES:
        raise ValueError(f"label must be one of {list(KAGGLE_CLASSES)}, got {label!r}")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 32 <= size <= 2048:
        raise ValueError(f"size must be an int in [32, 2048], got {size!r}")


def make_kaggle_phantom(label: str, seed: int | Sequence[int] = 0, size: int = 256) -> np.ndarray:
    """One synthetic Kaggle-style slice of class ``label``.

    Args:
        label: one of :data:`brainscan.labels.KAGGLE_CLASSES`.
        seed: non-negative int or tuple of ints (same seed -> same image).
        size: output side in pixels (the images are square).

    Returns:
        uint8 greyscale image ``(size, size)``.

    Raises:
        ValueError: for an unknown label, a bad seed or size.
    """
    return make_kaggle_phantom_with_info(label, seed, size)[0]


def make_kaggle_phantom_with_info(
    label: str, seed: int | Sequence[int] = 0, size: int = 256
) -> tuple[np.ndarray, KagglePhantomInfo]:
    """Like :func:`make_kaggle_phantom`, also returning how the image was made.

    Returns:
        ``(image (size, size) uint8, KagglePhantomInfo)``.
    """
    _check_label(label)
    _check_size(size)
    # The class is part of the seed, so that classes never share a slice for the same seed.
    rng = seeded_rng("kaggle", (KAGGLE_CLASSES.index(label), *_seed_tuple(seed)))
    contrast = str(rng.choice(list(_CONTRAST_PROBS), p=list(_CONTRAST_PROBS.values())))
    plane = str(rng.choice(PLANES, p=_PLANE_PROBS.get(label, _PLANE_PROBS["default"])))
    template = load_template()
    tissue = _CONTRASTS[contrast]

    lesion: _Lesion | None = None
    for _attempt in range(20):
        adenoma = _plan_adenoma(rng) if label == "pituitary" else None
        slicer = TemplateSlicer(plane, _pick_slice(rng, plane, adenoma))
        channels = {k: slicer.take(getattr(template, k)) for k in ("t1", "gm", "wm", "csf", "brain")}
        hull = _head_hull(channels["brain"])
        if label == "glioma":
            lesion = _plan_glioma(rng, channels)
        elif label == "meningioma":
            lesion = _plan_meningioma(rng, slicer, channels, hull)
        elif adenoma is not None:
            lesion = _section(slicer, "pituitary", *adenoma)
        if label == "notumor" or lesion is not None:
            break
    else:
        raise RuntimeError(f"could not place a {label} lesion in 20 attempts")

    if lesion is not None:
        channels = _push_tissue(channels, lesion, hull)
    canvas = _render_head(rng, channels, hull, tissue, contrast)
    # A normal gland on every slice through the sella, so "tissue at the sella" alone is no cue.
    gland = None if label == "pituitary" else _section(slicer, "gland", SELLA_MM, np.array(_GLAND_RADII_MM))
    for item in (gland, lesion):
        if item is not None:
            canvas = _paint(rng, canvas, item, channels, hull, tissue, contrast)
    image, matrix = _place_in_frame(rng, canvas, size)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    info = KagglePhantomInfo(
        label=label,
        plane=plane,
        slice_mm=slicer.slice_mm,
        contrast=contrast,
        lesion_mm=_lesion_mm(slicer, lesion, adenoma),
        lesion_radius_mm=None if lesion is None else lesion.radius,
        lesion_px=None if lesion is None else _transform_point(matrix, lesion.centre),
        lesion_radius_px=None if lesion is None else lesion.radius * scale,
    )
    return image, info


def _seed_tuple(seed: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return (int(seed),)
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise ValueError(f"seed must be a non-negative int or a tuple of them, got {seed!r}")
    return tuple(seed)


def _lesion_mm(
    slicer: TemplateSlicer, lesion: _Lesion | None, adenoma: tuple[np.ndarray, np.ndarray] | None
) -> tuple[float, float, float] | None:
    """MNI centre of the lesion: the 3D centre of an adenoma, else the in-plane centre."""
    if lesion is None:
        return None
    if adenoma is not None:
        return tuple(float(v) for v in adenoma[0])  # type: ignore[return-value]
    return slicer.to_mm(*lesion.centre)


def _plan_adenoma(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """3D centre (MNI mm) and radii of a pituitary macroadenoma; big ones grow up out of the sella."""
    radius = rng.uniform(5.0, 12.0)
    centre = SELLA_MM + np.array([rng.normal(0.0, 0.8), rng.uniform(-2.0, 3.0), 0.35 * radius])
    return centre, radius * rng.uniform(0.85, 1.15, size=3)


def _pick_slice(rng: np.random.Generator, plane: str, adenoma: tuple[np.ndarray, np.ndarray] | None) -> float:
    if adenoma is not None:
        normal = TemplateSlicer.NORMAL_AXIS[plane]
        centre, radii = adenoma
        return float(centre[normal] + rng.uniform(-0.45, 0.45) * radii[normal])
    low, high = slice_ranges()[plane]
    return float(rng.uniform(low, high))


def _section(
    slicer: TemplateSlicer, kind: str, centre_mm: np.ndarray, radii_mm: np.ndarray
) -> _Lesion | None:
    """Cross-section of an axis-aligned ellipsoid with the slice, or ``None`` if the slice misses it."""
    row, col, offset = slicer.to_pixel(centre_mm)
    normal = TemplateSlicer.NORMAL_AXIS[slicer.plane]
    cut = 1.0 - (offset / radii_mm[normal]) ** 2
    if cut < 0.15:
        return None
    _, row_axis, col_axis = slicer.axes
    radius_row, radius_col = radii_mm[row_axis] * np.sqrt(cut), radii_mm[col_axis] * np.sqrt(cut)
    # elongation < 1 flattens the blob along the row axis (angle 0 = rows).
    return _Lesion(
        kind=kind,
        centre=(row, col),
        radius=float(radius_col),
        elongation=float(radius_row / radius_col),
        push=0.8 if kind == "pituitary" else 0.0,
    )


def _plan_glioma(rng: np.random.Generator, channels: dict[str, np.ndarray]) -> _Lesion | None:
    """An intra-axial mass centred in white matter, at least 4 mm deeper than its radius."""
    radius = rng.uniform(8.0, 22.0)
    brain = (channels["brain"] > 0.5).astype(np.uint8)
    depth = cv2.distanceTransform(brain, cv2.DIST_L2, 5)
    rows, cols = np.nonzero((channels["wm"] > 0.6) & (depth >= radius + 4.0))
    if len(rows) == 0:
        return None
    pick = rng.integers(len(rows))
    centre = (float(rows[pick]), float(cols[pick]))
    elongation, angle, push = rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), rng.uniform(0.3, 0.6)
    return _Lesion("glioma", centre, radius, elongation, angle, push)


def _plan_meningioma(
    rng: np.random.Generator, slicer: TemplateSlicer, channels: dict[str, np.ndarray], hull: np.ndarray
) -> _Lesion | None:
    """A dural-based mass: on the convexity (hull edge) or on the falx (midline, axial/coronal)."""
    radius = rng.uniform(9.0, 24.0)
    brain = channels["brain"] > 0.5
    rows, cols = np.nonzero(brain)
    if len(rows) < 100:
        return None
    centroid = np.array([rows.mean(), cols.mean()])
    if slicer.plane != "sagittal" and rng.random() < 0.3:
        mid_col = slicer.to_pixel((0.0, 0.0, 0.0))[1]  # the midsagittal plane, x = 0
        column = np.flatnonzero(brain[:, int(round(mid_col))])
        if slicer.plane == "coronal":
            column = column[column < centroid[0]]  # the falx hangs above the corpus callosum
        if len(column) == 0:
            return None
        side = rng.choice([-1.0, 1.0])
        centre = (float(rng.choice(column)), float(mid_col + side * radius * rng.uniform(0.6, 0.95)))
    else:
        edge = (hull > 0.5) & (cv2.erode(hull, np.ones((3, 3), np.uint8)) < 0.5)
        if slicer.plane != "axial":
            edge[int(centroid[0]) :, :] = False  # convexity, not the skull base
        edge_rows, edge_cols = np.nonzero(edge)
        if len(edge_rows) == 0:
            return None
        pick = rng.integers(len(edge_rows))
        point = np.array([edge_rows[pick], edge_cols[pick]], dtype=float)
        inward = (centroid - point) / max(np.linalg.norm(centroid - point), 1e-6)
        centre = tuple(float(v) for v in point + inward * radius * rng.uniform(0.85, 1.0))
    return _Lesion("meningioma", centre, radius, rng.uniform(0.8, 1.0), rng.uniform(0, np.pi), push=1.0)


def _head_hull(brain: np.ndarray) -> np.ndarray:
    """Filled convex hull of the brain section: the intracranial space of this slice (float32 0/1)."""
    mask = (brain > 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = np.zeros_like(mask)
    if contours:
        cv2.fillConvexPoly(hull, cv2.convexHull(np.concatenate(contours)), 1)
    return hull.astype(np.float32)


def _render_head(
    rng: np.random.Generator,
    channels: dict[str, np.ndarray],
    hull: np.ndarray,
    tissue: dict[str, float],
    contrast: str,
) -> np.ndarray:
    """Brain tissue contrast plus CSF, skull, diploe and scalp layers outside the hull (float32)."""
    brain = np.clip(channels["brain"], 0.0, 1.0)
    mix = tissue["wm"] * channels["wm"] + tissue["gm"] * channels["gm"] + tissue["csf"] * channels["csf"]
    if contrast == "t1":
        mix = 0.5 * mix + 0.5 * channels["t1"] / 0.87
    texture = 1.0 + 0.25 * smooth_noise_2d(rng, hull.shape, 24)
    # Inside the skull but outside the brain section: sulcal CSF and skull-base tissue.
    canvas = mix + (1.0 - brain) * hull * tissue["gap"] * texture
    outside = cv2.distanceTransform((hull < 0.5).astype(np.uint8), cv2.DIST_L2, 5)
    depth = outside * rng.uniform(0.8, 1.25) + 1.2 * smooth_noise_2d(rng, hull.shape, 10)
    inner = 0.0
    for outer, name in _SHELL:
        layer = (depth > inner) & (depth <= outer) & (hull < 0.5)
        canvas[layer] = tissue[name] * texture[layer]
        inner = outer
    return cv2.GaussianBlur(canvas, (0, 0), 0.6)


def _place_in_frame(rng: np.random.Generator, canvas: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate, zoom and shift the head into a ``size`` square, then window to uint8.

    Returns:
        ``(image uint8 (size, size), matrix (2, 3))`` mapping canvas ``(x=col, y=row)`` to output.
    """
    rows, cols = np.nonzero(canvas > 0.02)
    centre = ((cols.min() + cols.max()) / 2.0, (rows.min() + rows.max()) / 2.0)
    extent = max(cols.max() - cols.min(), rows.max() - rows.min()) + 1
    fill = rng.uniform(0.72, 0.97)  # the rest is black border, as in the real images
    angle = rng.normal(0.0, 6.0)
    matrix = cv2.getRotationMatrix2D(centre, angle, fill * size / extent)
    shift = rng.uniform(-0.5, 0.5, size=2) * (1.0 - fill) * size * 0.5
    matrix[:, 2] += np.array([size / 2.0, size / 2.0]) - np.array(centre) + shift
    warped = cv2.warpAffine(
        canvas, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    head = warped > 0.02
    bias = np.exp(0.25 * smooth_noise_2d(rng, warped.shape, 3) * rng.uniform(0.3, 1.0))
    sigma = rng.uniform(0.008, 0.035)
    real = warped * bias + sigma * rng.standard_normal(warped.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(warped.shape, dtype=np.float32)
    signal = np.sqrt(real * real + imag * imag)
    # A random window: the brightest tissue lands anywhere from mid-grey to white.
    top = float(np.percentile(signal[head], 99.5)) if head.any() else 1.0
    scaled = (signal / max(top, 1e-6)) ** rng.uniform(0.75, 1.3) * rng.uniform(150.0, 255.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), matrix


def _transform_point(matrix: np.ndarray, row_col: tuple[float, float]) -> tuple[float, float]:
    x, y = matrix @ np.array([row_col[1], row_col[0], 1.0])
    return float(y), float(x)


def encode_jpeg(image: np.ndarray) -> bytes:
    """8-bit greyscale baseline JPEG, quality 90, fixed encoder settings (same bytes every run).

    The template's copyright notice rides along in a JPEG comment (COM) segment, so it travels
    with every copied image and no extra file disturbs the dataset layout.
    """
    ok, buffer = cv2.imencode(".jpg", image, _JPEG_PARAMS)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    raw = buffer.tobytes()
    comment = MNI_TEMPLATE_NOTICE.encode("ascii")
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return raw[:2] + segment + raw[2:]  # right after the SOI marker


def kaggle_file_name(label: str, number: int, split: str = "Training") -> str:
    """Real-dataset style name, e.g. ``Tr-gl_0001.jpg``."""
    return f"{SPLIT_CODES[split]}-{CLASS_CODES[label]}_{number:04d}.jpg"


def write_kaggle_phantoms(
    out_dir: str | Path, n: int = 400, seed: int = 0, size: int = 256, split: str = "Training"
) -> Path:
    """Write ``n`` images in the Kaggle layout, balanced over the four classes.

    Layout: ``out_dir/{split}/{glioma,meningioma,notumor,pituitary}/{Tr|Te}-{gl|me|no|pi}_NNNN.jpg``,
    numbered from 0001 per class (the template's copyright notice is in each file's JPEG comment). Each class
    gets ``n // 4`` images (the first ``n % 4`` classes one more). Image ``k`` of class ``c`` is
    ``make_kaggle_phantom(c, (seed, split_index, k), size)`` (split_index 0 for Training, 1 for
    Testing), so a smaller set is a subset of a larger one with the same seed.

    Args:
        out_dir: dataset root (created if missing).
        n: total number of images, >= 1 (use a multiple of 4 for a balanced set).
        seed: non-negative dataset seed.
        size: image side in pixels.
        split: ``"Training"`` or ``"Testing"``.

    Returns:
        The split folder ``out_dir/split`` (it holds the class folders).

    Raises:
        ValueError: for a bad ``n``, ``seed``, ``size`` or ``split``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {list(SPLIT_CODES)}, got {split!r}")
    _check_size(size)
    out_dir = Path(out_dir)
    split_dir = out_dir / split
    split_index = list(SPLIT_CODES).index(split)
    for class_index, label in enumerate(KAGGLE_CLASSES):
        count = n // len(KAGGLE_CLASSES) + (class_index < n % len(KAGGLE_CLASSES))
        class_dir = split_dir / label
        class_dir.mkdir(parents=True, exist_ok=True)
        for number in range(1, count + 1):
            image = make_kaggle_phantom(label, (seed, split_index, number), size)
            (class_dir / kaggle_file_name(label, number, split)).write_bytes(encode_jpeg(image))
    return split_dir
