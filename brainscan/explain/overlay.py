"""Render a heatmap and the image the model saw as the two PNG data URLs of the classifier API.

``image_png`` is the model's view of the upload (head-cropped, square, greyscale, at the network
input size); ``overlay_png`` is an RGBA colour map of the same size whose alpha grows with the
importance, so a client can lay it over ``image_png`` (or over nothing) without re-blending.
Pure numpy/OpenCV: no TensorFlow.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

#: OpenCV colour maps by name
COLORMAPS = {"jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO}


def model_view(image: np.ndarray, *, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """The network input as a displayable uint8 greyscale image.

    Args:
        image: preprocessed ``(S, S, C)`` or ``(S, S)`` float array (channels are grey copies, the
            first is shown).
        value_range: the input's value range, e.g. ``(0, 1)`` for ``zero_one`` normalisation;
            ``None`` stretches the image's own min..max (for ``zscore`` inputs).

    Returns:
        uint8 ``(S, S)``.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[:, :, 0]
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be (S, S) or (S, S, C), got shape {image.shape}")
    low, high = value_range if value_range is not None else (float(image.min()), float(image.max()))
    if not high > low:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.clip(np.rint((image - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def colorize(heatmap: np.ndarray, size: tuple[int, int] | None = None, *, colormap: str = "jet",
             max_alpha: float = 0.75) -> np.ndarray:
    """Colour-map a heatmap into an RGBA image whose alpha is proportional to the importance.

    Args:
        heatmap: ``(h, w)`` in [0, 1].
        size: output ``(height, width)``; the heatmap is resized (bilinear) to it.
        colormap: ``"jet"`` or ``"turbo"``.
        max_alpha: alpha of importance 1, in (0, 1].

    Returns:
        uint8 ``(height, width, 4)`` in OpenCV's BGRA channel order (what ``cv2.imencode`` writes
        as RGBA).

    Raises:
        ValueError: a bad shape, values outside [0, 1] or NaN, an unknown colour map.
    """
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {sorted(COLORMAPS)}, got {colormap!r}")
    if not 0.0 < max_alpha <= 1.0:
        raise ValueError(f"max_alpha must be in (0, 1], got {max_alpha}")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap must be (h, w), got shape {heatmap.shape}")
    if not np.isfinite(heatmap).all() or heatmap.min() < -1e-6 or heatmap.max() > 1 + 1e-6:
        raise ValueError(f"heatmap values must lie in [0, 1], got [{heatmap.min()}, {heatmap.max()}]")
    if size is not None and heatmap.shape != tuple(size):
        heatmap = cv2.resize(heatmap, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    level = np.clip(np.rint(heatmap * 255.0), 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(level, COLORMAPS[colormap])
    alpha = np.clip(np.rint(heatmap * (255.0 * max_alpha)), 0, 255).astype(np.uint8)
    return np.dstack([bgr, alpha])


def png_data_url(image: np.ndarray) -> str:
    """Encode a uint8 ``(H, W)``, ``(H, W, 3)`` BGR or ``(H, W, 4)`` BGRA image as a PNG data URL."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"png_data_url expects uint8 pixels, got {image.dtype}")
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {image.shape} as PNG")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def heatmap_pngs(heatmap: np.ndarray, view: np.ndarray, *, colormap: str = "jet") -> dict[str, str]:
    """The ``image_png`` / ``overlay_png`` pair of the classifier API.

    Args:
        heatmap: ``(h, w)`` in [0, 1], resized to the view's size.
        view: uint8 ``(S, S)`` from :func:`model_view`.
        colormap: see :func:`colorize`.

    Returns:
        ``{"image_png": data URL, "overlay_png": data URL}``, both ``S x S``.
    """
    view = np.asarray(view)
    if view.ndim != 2:
        raise ValueError(f"view must be a greyscale (S, S) image, got shape {view.shape}")
    return {
        "image_png": png_data_url(view),
        "overlay_png": png_data_url(colorize(heatmap, view.shape, colormap=colormap)),
    }
