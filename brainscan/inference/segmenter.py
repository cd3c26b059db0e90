"""The one prediction path for 3D segmentation: :class:`Segmenter`.

A :class:`Segmenter` holds a network with everything needed to turn a case into a BraTS mask on
the case's own grid: the preprocessing, the sliding-window settings, the kind of output (``classes``:
softmax over background/NCR/ED/ET; ``regions``: sigmoids for WT/TC/ET), the label map and the
post-processing. It is built from a bundle (:meth:`Segmenter.from_bundle`: services, ``evaluate``,
``predict``) or from an in-memory model with the settings a bundle will record (training
validation), so the weights are selected by the same code that serves them.

Steps of :meth:`Segmenter.segment`:

1. preprocess (z-score in the brain, crop, resample to the manifest's spacing, pad);
2. sliding window with Gaussian blending (and mirroring if configured);
3. back to the input grid: probabilities are interpolated to the crop's voxels, then decoded
   (argmax over classes, or nested thresholds over regions);
4. post-processing (small components, a minimum enhancing-tumour volume).

Example:
    >>> segmenter = Segmenter.from_bundle(load_bundle("models/segmentation/unet3d/1"))
    >>> mask = segmenter.segment(loaded.channels, spacing=loaded.reference.spacing)  # uint8 (X, Y, Z)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from brainscan.errors import BadDimensionsError, BundleError, EmptyInputError, VolumeMismatchError
from brainscan.inference.postprocess import PostprocessConfig, postprocess_labels
from brainscan.labels import BRATS_LABELS, MODALITIES, REGION_ORDER
from brainscan.preprocess.volume3d import (
    CropInfo,
    VolumePreprocessConfig,
    preprocess_case,
    restore_regions,
    restore_to_original,
)

ProgressFn = Callable[[int, int], None]
OUTPUT_KINDS = ("classes", "regions")


class Segmenter:
    """A segmentation network with its preprocessing, window settings and decoding.

    Args:
        model: Keras model ``(B, X, Y, Z, C) -> (B, X, Y, Z, K)`` probabilities, or ``None`` when
            ``predict_fn`` is given.
        preprocess_config: the bundle's :class:`VolumePreprocessConfig`.
        patch_size, overlap, batch_size, mirror_axes: sliding-window settings.
        one_pass: run the whole preprocessed volume (the brain crop) in one network call instead
            of windows: fewer voxels computed when the crop is small, as at 2 mm.
        outputs: ``"classes"`` (K = len(label_map), argmax) or ``"regions"`` (K = 3, WT/TC/ET).
        label_map: output index -> BraTS label (classes outputs).
        postprocessing: :class:`PostprocessConfig`.
        predict_fn: a ready ``predict_fn(batch) -> probabilities`` (built from ``model`` if None).

    Raises:
        ValueError: an unknown output kind or inconsistent settings.
    """

    def __init__(self, model: Any, preprocess_config: VolumePreprocessConfig, *, patch_size: Sequence[int],
                 overlap: float = 0.5, batch_size: int = 1, mirror_axes: Sequence[int] = (),
                 one_pass: bool = False, outputs: str = "classes", label_map: dict[int, int] | None = None,
                 postprocessing: PostprocessConfig | None = None,
                 predict_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if outputs not in OUTPUT_KINDS:
            raise ValueError(f"outputs must be one of {OUTPUT_KINDS}, got {outputs!r}")
        if model is None and predict_fn is None:
            raise ValueError("Segmenter needs a model or a predict_fn")
        self.model = model
        self.preprocess_config = preprocess_config
        self.patch_size = tuple(int(p) for p in patch_size)
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.one_pass = bool(one_pass)
        self.outputs = outputs
        self.label_map = dict(label_map) if label_map is not None else dict(enumerate(BRATS_LABELS))
        self.postprocessing = postprocessing or PostprocessConfig()
        self._predict_fn = predict_fn

    @classmethod
    def from_bundle(cls, bundle: Any, overrides: dict[str, Any] | None = None,
                    predict_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> Segmenter:
        """The segmenter a bundle's manifest describes; ``overrides`` of the window settings win.

        Raises:
            BundleError: not a segmentation bundle, or a manifest section that cannot be used.
        """
        _check_segmenter(bundle)
        settings = inference_settings(bundle, overrides)
        spec = bundle.spec.inference
        try:
            postprocessing = PostprocessConfig.from_dict(spec.postprocessing)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"bundle {bundle.path}: {exc}") from exc
        return cls(bundle.model, bundle.preprocess_config, **settings, outputs=spec.outputs,
                   label_map=bundle.label_map, postprocessing=postprocessing, predict_fn=predict_fn)

    @property
    def num_outputs(self) -> int:
        return len(REGION_ORDER) if self.outputs == "regions" else len(self.label_map)

    @property
    def predict_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        """The compiled forward pass (built once, on first use)."""
        if self._predict_fn is None:
            from brainscan.inference.sliding_window import keras_predict_fn

            self._predict_fn = keras_predict_fn(self.model, batch_size=self.batch_size)
        return self._predict_fn

    def manifest_inference(self) -> dict[str, Any]:
        """The ``inference`` section a bundle of this segmenter records."""
        return {"patch_size": list(self.patch_size), "overlap": self.overlap, "batch_size": self.batch_size,
                "mirror_axes": list(self.mirror_axes), "one_pass": self.one_pass, "outputs": self.outputs,
                "postprocessing": self.postprocessing.to_dict()}

    def preprocess(self, channels: np.ndarray, spacing: Sequence[float] | None = None,
                   affine: np.ndarray | None = None) -> tuple[np.ndarray, CropInfo]:
        """``(C, X, Y, Z)`` -> network input ``(X', Y', Z', C)`` and its :class:`CropInfo`."""
        return preprocess_case(channels, self.preprocess_config, spacing=spacing, affine=affine)

    def probabilities(self, volume: np.ndarray, progress: ProgressFn | None = None) -> np.ndarray:
        """Sliding-window probabilities ``(X', Y', Z', K)`` of a preprocessed volume."""
        from brainscan.inference.sliding_window import sliding_window_inference

        patch = tuple(volume.shape[:3]) if self.one_pass else self.patch_size
        return sliding_window_inference(
            volume, self.predict_fn, patch_size=patch, overlap=self.overlap, batch_size=self.batch_size,
            mirror_axes=self.mirror_axes, num_classes=self.num_outputs, progress=progress,
        )

    def decode(self, probabilities: np.ndarray, info: CropInfo, spacing: Sequence[float] | None = None) -> np.ndarray:
        """Network probabilities -> post-processed BraTS labels ``(X, Y, Z)`` uint8 on the input grid."""
        if probabilities.ndim != 4 or probabilities.shape[-1] != self.num_outputs:
            raise BadDimensionsError(f"expected (X, Y, Z, {self.num_outputs}) probabilities, got {probabilities.shape}")
        if self.outputs == "regions":
            labels = restore_regions(probabilities, info, self.postprocessing.threshold)
        else:
            lookup = np.zeros(len(self.label_map), dtype=np.uint8)
            for index, label in self.label_map.items():
                lookup[int(index)] = label
            if info.resampled_shape is None:
                # Same grid: decode first (exact, and a quarter of the memory).
                labels = restore_to_original(lookup[np.argmax(probabilities, axis=-1)], info, fill=0)
            else:
                background = tuple(1.0 if lookup[k] == 0 else 0.0 for k in range(len(lookup)))
                restored = restore_to_original(probabilities, info, fill=background)
                labels = lookup[np.argmax(restored, axis=-1)]
        return postprocess_labels(labels, self.postprocessing, spacing)

    def segment(self, channels: np.ndarray, spacing: Sequence[float] | None = None, *,
                affine: np.ndarray | None = None, progress: ProgressFn | None = None) -> np.ndarray:
        """``(C, X, Y, Z)`` channels -> BraTS labels ``(X, Y, Z)`` uint8 on the same voxel grid.

        Args:
            channels: the modalities in the bundle's order, in the file's voxel order.
            spacing: voxel size in mm (default: from ``affine``, else 1 mm).
            affine: the case's 4x4 voxel-to-world matrix: a case in another orientation is turned
                into the network's (the manifest's ``orientation``) and the mask turned back.
            progress: called with ``(patches_done, patches_total)``.
        """
        volume, info = self.preprocess(channels, spacing, affine)
        probabilities = self.probabilities(volume, progress)
        del volume
        return self.decode(probabilities, info, spacing)


_INFERENCE_KEYS = ("patch_size", "overlap", "batch_size", "mirror_axes", "one_pass")


def _check_segmenter(bundle: Any) -> None:
    if bundle.task != "segmentation":
        raise BundleError(
            f"bundle {bundle.name} ({bundle.path}) is a {bundle.task} model; a segmentation bundle is needed"
        )


def inference_settings(bundle: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sliding-window settings: the manifest's ``inference`` section, updated by ``overrides``.

    Args:
        bundle: a segmentation bundle.
        overrides: any of ``patch_size``, ``overlap``, ``batch_size``, ``mirror_axes``, ``one_pass``
            (``None`` values are ignored), e.g. ``{"overlap": 0.0}`` for a quick preview.

    Returns:
        ``{"patch_size": (x, y, z), "overlap": float, "batch_size": int, "mirror_axes": tuple,
        "one_pass": bool}`` (``one_pass``: the whole preprocessed volume in one network call).

    Raises:
        ValueError: an unknown override key.
        BundleError: the manifest has no patch size (and none was given).
    """
    unknown = sorted(set(overrides or {}) - set(_INFERENCE_KEYS))
    if unknown:
        raise ValueError(f"unknown inference settings {unknown}; known: {list(_INFERENCE_KEYS)}")
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    merged = {key: given.get(key, getattr(bundle.spec.inference, key)) for key in _INFERENCE_KEYS}
    if merged["patch_size"] is None:
        raise BundleError(f"bundle {bundle.path}: manifest inference section has no patch_size")
    return {
        "patch_size": tuple(int(p) for p in merged["patch_size"]),
        "overlap": float(merged["overlap"]),
        "batch_size": int(merged["batch_size"] or 1),
        "mirror_axes": tuple(int(a) for a in (merged["mirror_axes"] or ())),
        "one_pass": bool(merged["one_pass"]),
    }


def _select_modalities(bundle: Any, channels: np.ndarray) -> np.ndarray:
    """The channels the network expects, in its order, from ``(4, X, Y, Z)`` in MODALITIES order."""
    wanted = list(bundle.spec.input.modalities or MODALITIES)
    if wanted == list(MODALITIES):
        return channels
    missing = [m for m in wanted if m not in MODALITIES]
    if missing:
        raise BundleError(f"bundle {bundle.path} expects modalities {missing} that BraTS cases do not have")
    return channels[[MODALITIES.index(m) for m in wanted]]


def segment_case(
    bundle: Any,
    case: Any,
    reference: Any | None = None,
    *,
    progress: ProgressFn | None = None,
    inference: dict[str, Any] | None = None,
    predict_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Segment one case and return BraTS labels on the input grid.

    Args:
        bundle: a segmentation :class:`~brainscan.models.bundle.Bundle`.
        case: a :class:`~brainscan.data.brats.LoadedCase`, or channels ``(4, X, Y, Z)`` in
            :data:`~brainscan.labels.MODALITIES` order.
        reference: the :class:`~brainscan.io.nifti.Volume` the mask will be written against
            (default: ``case.reference`` for a loaded case); only its shape is checked here.
        progress: called after each network call with ``(patches_done, patches_total)``.
        inference: overrides of the manifest's sliding-window settings (see
            :func:`inference_settings`).
        predict_fn: ``keras_predict_fn(bundle.model, batch_size)`` built once by a caller that
            segments many cases (each new one traces the graph again); built here if ``None``.

    Returns:
        uint8 ``(X, Y, Z)`` mask with values in {0, 1, 2, 4}; 0 outside the brain crop.

    Raises:
        BundleError: ``bundle`` is not a segmentation bundle.
        BadDimensionsError: ``case`` is not ``(4, X, Y, Z)``.
        VolumeMismatchError: ``reference`` is on another grid than the channels.
        And the errors of ``preprocess_case`` (NaN/inf voxels) and ``sliding_window_inference``.
    """
    _check_segmenter(bundle)
    channels = np.asarray(getattr(case, "channels", case))
    if reference is None:
        reference = getattr(case, "reference", None)
    if channels.ndim != 4 or channels.shape[0] != len(MODALITIES):
        raise BadDimensionsError(
            f"case channels must be ({len(MODALITIES)}, X, Y, Z) in {MODALITIES} order, got shape {channels.shape}"
        )
    if channels.size == 0:
        raise EmptyInputError(f"case channels are empty, shape {channels.shape}")
    if reference is not None and tuple(reference.shape[:3]) != tuple(channels.shape[1:]):
        raise VolumeMismatchError(
            f"reference grid {tuple(reference.shape[:3])} differs from the channels' grid {tuple(channels.shape[1:])}"
        )
    spacing = tuple(reference.spacing[:3]) if reference is not None else None
    affine = getattr(reference, "affine", None)
    segmenter = Segmenter.from_bundle(bundle, inference, predict_fn=predict_fn)
    return segmenter.segment(_select_modalities(bundle, channels), spacing, affine=affine, progress=progress)


__all__ = ["OUTPUT_KINDS", "Segmenter", "inference_settings", "segment_case"]
