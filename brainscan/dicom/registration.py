"""Bring t1, t2 and flair onto the t1ce series' grid: rigid registration (SimpleITK), then resampling.

Series of one MR session share a frame of reference (FrameOfReferenceUID): their scanner
coordinates already agree up to patient motion between series. Registration therefore starts from
that geometry (identity in patient coordinates, rotation about the t1ce volume's centre) and looks
for a small rigid correction: Euler3D (3 rotations, 3 translations), Mattes mutual information (the
modalities differ in contrast), regular-step gradient descent over three resolutions (shrink 4, 2,
1; smoothing 2, 1, 0 mm), a fixed seed for the metric's random samples so results repeat. Series
without a shared frame of reference start from their centres of mass instead. Both the DICOM and the
NIfTI path register copies no finer than :data:`REGISTRATION_SPACING_MM` on any axis (finer axes
smoothed and resampled to it, coarser ones, such as thick slices, kept as they are) and resample the
full-resolution volume with the transform found.

The result is kept only if it is plausible: the metric must improve on the starting geometry and,
for a shared frame of reference, the correction must stay within :data:`MAX_ROTATION_DEG` and
:data:`MAX_TRANSLATION_MM` (patient motion between series is smaller; a larger "correction" is a
registration that went astray). Otherwise the geometry alone is used and the record says why.
Either way every transform applied is returned as a JSON-able record.

:func:`align_volumes` does this for plain ``(array, RAS affine)`` volumes (NIfTI uploads on different
grids, :mod:`brainscan.preprocess.align`); :func:`align_to_reference` for DICOM series.

Example:
    >>> channels, transforms = align_to_reference({"t1": v1, "t1ce": v1ce, "t2": v2, "flair": vf})
    >>> channels.shape                      # (4, *t1ce grid), MODALITIES order
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from brainscan.dicom.volume import LPS_TO_RAS, SeriesVolume
from brainscan.labels import MODALITIES
from brainscan.preprocess.align import REGISTRATION_SPACING_MM

logger = logging.getLogger(__name__)

REFERENCE = "t1ce"
METHODS = ("rigid", "geometry")
MAX_ROTATION_DEG = 15.0
MAX_TRANSLATION_MM = 20.0
_SEED = 20261201


def to_sitk(data: np.ndarray, affine: np.ndarray) -> Any:
    """A SimpleITK image (LPS physical space) of a ``(X, Y, Z)`` array with a RAS ``affine``."""
    import SimpleITK as sitk

    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    return image


def from_sitk(image: Any) -> np.ndarray:
    """The ``(X, Y, Z)`` array of a SimpleITK image (inverse of :func:`to_sitk`'s voxel order)."""
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def isotropic(image: Any, spacing: float = REGISTRATION_SPACING_MM) -> Any:
    """``image`` smoothed (where its voxels are finer) and resampled to ``spacing`` mm, same direction."""
    return _resampled(image, [float(spacing)] * 3)


def no_finer(image: Any, spacing: float = REGISTRATION_SPACING_MM) -> Any:
    """``image`` on a grid no finer than ``spacing`` mm: axes with finer voxels are smoothed and resampled
    to ``spacing``, coarser ones keep their own spacing (resampling them finer adds voxels to the
    registration's work, not information)."""
    return _resampled(image, [max(float(spacing), float(s)) for s in image.GetSpacing()])


def _resampled(image: Any, target: list[float]) -> Any:
    import SimpleITK as sitk

    old = np.asarray(image.GetSpacing(), dtype=np.float64)
    # Anti-aliasing where voxels are finer than the target; a floor, as ITK's filter needs sigma > 0.
    sigma = [max(0.5 * float(np.sqrt(max(t ** 2 - s ** 2, 0.0))), 0.1 * float(s)) for s, t in zip(old, target)]
    smoothed = sitk.SmoothingRecursiveGaussian(image, sigma)
    size = [max(int(np.ceil(n * s / t)), 1) for n, s, t in zip(image.GetSize(), old, target, strict=True)]
    return sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), target,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def _matrix(transform: Any) -> np.ndarray:
    """4x4 matrix of an ITK rigid transform: fixed (t1ce) LPS point -> moving series' LPS point."""
    rotation = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = translation + center - rotation @ center
    return matrix


def _rotation_deg(matrix: np.ndarray) -> float:
    cos = (np.trace(matrix[:3, :3]) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def mutual_information(sampling: float | Sequence[float], seed: int = _SEED) -> Any:
    """A SimpleITK registration method with brainscan's metric: Mattes mutual information (32 bins)
    on random samples drawn with a fixed ``seed`` (so results repeat), linear interpolation.

    Args:
        sampling: fraction of the fixed image's voxels sampled, or one fraction per pyramid level.
        seed: the samples' seed.
    """
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    if isinstance(sampling, int | float):
        method.SetMetricSamplingPercentage(float(sampling), seed)
    else:
        method.SetMetricSamplingPercentagePerLevel([float(v) for v in sampling], seed)
    method.SetInterpolator(sitk.sitkLinear)
    # Gradients at the sampled points only (finite differences of the interpolated moving image),
    # not smoothed gradient images of both whole volumes at every level: the fixed image's was never
    # used, the moving image's took a third of each registration. Time and accuracy, before and
    # after: bench/README.md (registration.py, skullstrip.py).
    method.MetricUseFixedImageGradientFilterOff()
    method.MetricUseMovingImageGradientFilterOff()
    return method


def gradient_descent(method: Any, *, learning_rate: float, iterations: int, shrink: Sequence[int],
                     smoothing_mm: Sequence[float]) -> Any:
    """``method`` set to optimise by regular-step gradient descent (steps scaled by physical shift)
    over a pyramid: one shrink factor and one smoothing sigma (mm) per level. Returns ``method``."""
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-3,
                                                    numberOfIterations=iterations, relaxationFactor=0.5,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([int(v) for v in shrink])
    method.SetSmoothingSigmasPerLevel([float(v) for v in smoothing_mm])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def register_rigid(fixed: Any, moving: Any, *, same_frame: bool = True, sampling: float = 0.1,
                   iterations: int = 100) -> tuple[Any, dict[str, Any]]:
    """Rigidly register ``moving`` to ``fixed`` (SimpleITK images in LPS space).

    Args:
        fixed: the reference (t1ce) image.
        moving: the series to align.
        same_frame: the two share a FrameOfReferenceUID: start from the scanner geometry and bound
            the correction; else start from the centres of mass.
        sampling: fraction of fixed voxels the metric samples (seeded).
        iterations: most optimizer steps per resolution.

    Returns:
        ``(transform, record)``: the ITK transform to resample ``moving`` with (the starting
        geometry if the registration was rejected) and its JSON-able record.
    """
    import SimpleITK as sitk

    if same_frame:
        center = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
        initial = sitk.Euler3DTransform()
        initial.SetCenter(center)
        initialisation = "scanner coordinates (shared FrameOfReferenceUID)"
    else:
        initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
        initialisation = "centres of mass (no shared FrameOfReferenceUID)"
    method = gradient_descent(mutual_information(sampling), learning_rate=2.0, iterations=iterations,
                              shrink=[4, 2, 1], smoothing_mm=[2.0, 1.0, 0.0])
    method.SetInitialTransform(sitk.Euler3DTransform(initial), inPlace=False)
    result = method.Execute(fixed, moving)
    final = sitk.Euler3DTransform(sitk.CompositeTransform(result).GetNthTransform(0)) \
        if isinstance(result, sitk.CompositeTransform) else sitk.Euler3DTransform(result)

    # Judge both transforms with one full-resolution metric and the same samples.
    judge = mutual_information(max(sampling, 0.2))
    judge.SetInitialTransform(initial)
    metric_before = float(judge.MetricEvaluate(fixed, moving))
    judge.SetInitialTransform(final)
    metric_after = float(judge.MetricEvaluate(fixed, moving))
    start, found = _matrix(initial), _matrix(final)
    correction = np.linalg.solve(start, found)
    rotation, translation = _rotation_deg(correction), float(np.linalg.norm(correction[:3, 3]))
    reason = None
    if not metric_after < metric_before:
        reason = "registration did not improve mutual information over the starting geometry"
    elif same_frame and (rotation > MAX_ROTATION_DEG or translation > MAX_TRANSLATION_MM):
        reason = (f"registration moved the series by {rotation:.1f} deg / {translation:.1f} mm, beyond the "
                  f"{MAX_ROTATION_DEG} deg / {MAX_TRANSLATION_MM} mm that patient motion explains")
    accepted = reason is None
    chosen = final if accepted else initial
    record = {
        "method": "rigid" if accepted else "geometry",
        "registration": {
            "transform": "Euler3D", "metric": "Mattes mutual information (32 bins)",
            "optimizer": "regular step gradient descent", "levels": {"shrink": [4, 2, 1], "smoothing_mm": [2, 1, 0]},
            "sampling": sampling, "seed": _SEED, "initialisation": initialisation,
            "iterations": int(method.GetOptimizerIteration()),
            "stop_condition": method.GetOptimizerStopConditionDescription(),
            "metric_before": metric_before, "metric_after": metric_after,
            "correction_rotation_deg": rotation, "correction_translation_mm": translation,
            "accepted": accepted, "rejected_because": reason,
        },
        "matrix_lps": _matrix(chosen).tolist(),
    }
    return chosen, record


def align_volumes(volumes: Mapping[str, tuple[np.ndarray, np.ndarray]], *, method: str = "rigid",
                  reference: str = REFERENCE, same_frame: Mapping[str, bool] | bool = True,
                  registration_spacing_mm: float | None = None,
                  describe: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Resample every modality onto the reference volume's grid, registering it first if asked.

    Each volume is a plain ``(data (X, Y, Z), RAS affine)`` pair on its own grid; the affines place
    them in one world (scanner) frame, which is where registration starts from.

    Args:
        volumes: ``{modality: (data, affine)}`` for the four :data:`~brainscan.labels.MODALITIES`.
        method: ``"rigid"`` (register, then resample) or ``"geometry"`` (resample by the affines alone).
        reference: the modality whose grid the others are brought onto (t1ce).
        same_frame: whether each modality shares the reference's world frame (one bool for all, or per
            modality): see :func:`register_rigid`.
        registration_spacing_mm: register on copies no finer than this on any axis (e.g. 2 mm: seconds,
            not minutes, for 1 mm volumes; thick slices keep their thickness); ``None`` registers the
            volumes as they are. The transform
            found is physical, so resampling is always from the full-resolution volume.
        describe: per modality, fields that open its record (e.g. the series' UID).

    Returns:
        ``(channels, transforms)``: float32 ``(4, X, Y, Z)`` in MODALITIES order on the reference
        grid (0 where a volume does not reach), and one record per modality with ``modality``,
        ``method`` (``"reference"``, ``"rigid"`` or ``"geometry"``), ``matrix_lps`` (4x4: reference
        LPS point -> that volume's LPS point), ``interpolation`` and, for a registration, its
        settings, metric values and outcome.

    Raises:
        ValueError: an unknown ``method`` or a missing modality.
    """
    import SimpleITK as sitk

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    missing = [m for m in MODALITIES if m not in volumes]
    if missing:
        raise ValueError(f"volumes lack {missing}")
    fixed = to_sitk(*volumes[reference])
    fixed_small = fixed
    if registration_spacing_mm is not None and method == "rigid":
        fixed_small = no_finer(fixed, registration_spacing_mm)
    channels, transforms = [], []
    for modality in MODALITIES:
        data, affine = volumes[modality]
        record: dict[str, Any] = {"modality": modality, **dict((describe or {}).get(modality, {}))}
        if modality == reference:
            channels.append(np.asarray(data, dtype=np.float32))
            transforms.append({**record, "method": "reference", "matrix_lps": np.eye(4).tolist(),
                               "interpolation": None})
            continue
        moving = to_sitk(data, affine)
        shared = same_frame if isinstance(same_frame, bool) else bool(same_frame.get(modality, False))
        if method == "rigid":
            moving_small = moving if fixed_small is fixed else no_finer(moving, registration_spacing_mm)
            transform, found = register_rigid(fixed_small, moving_small, same_frame=shared)
            found["registration"]["spacing_mm"] = registration_spacing_mm
            found["registration"]["grid_mm"] = {  # per axis, as registered (thick slices keep theirs)
                "reference": [round(s, 4) for s in fixed_small.GetSpacing()],
                "moving": [round(s, 4) for s in moving_small.GetSpacing()]}
        else:
            transform = sitk.Euler3DTransform()
            found = {"method": "geometry", "matrix_lps": np.eye(4).tolist()}
        resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        channels.append(from_sitk(resampled))
        transforms.append({**record, **found, "interpolation": "linear", "resampled_onto": reference})
        logger.info("%s aligned to %s: %s", modality, reference, found["method"])
    return np.stack(channels).astype(np.float32, copy=False), transforms


def align_to_reference(volumes: Mapping[str, SeriesVolume], *, method: str = "rigid", reference: str = REFERENCE,
                       registration_spacing_mm: float | None = REGISTRATION_SPACING_MM,
                       ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Resample every DICOM series onto the reference series' grid (:func:`align_volumes`).

    Series share the reference's frame when their FrameOfReferenceUID is the reference's; each
    record opens with the series' ``series_instance_uid`` and ``series_number``.

    Args:
        volumes: ``{modality: SeriesVolume}`` for the four :data:`~brainscan.labels.MODALITIES`.
        method: ``"rigid"`` or ``"geometry"`` (resample by the DICOM geometry alone).
        reference: the modality whose grid the others are brought onto (t1ce).
        registration_spacing_mm: see :func:`align_volumes` (``None``: register on the series' own grids).

    Returns:
        ``(channels, transforms)`` as :func:`align_volumes` returns them.

    Raises:
        ValueError: an unknown ``method`` or a missing modality.
    """
    missing = [m for m in MODALITIES if m not in volumes]
    if missing:
        raise ValueError(f"volumes lack {missing}")
    frame = str(volumes[reference].instances[0].get("FrameOfReferenceUID", "") or "")
    same_frame = {m: bool(frame) and str(v.instances[0].get("FrameOfReferenceUID", "") or "") == frame
                  for m, v in volumes.items()}
    describe = {m: {"series_instance_uid": v.series.uid, "series_number": v.series.number} for m, v in volumes.items()}
    return align_volumes({m: (v.data, v.affine) for m, v in volumes.items()}, method=method, reference=reference,
                         same_frame=same_frame, registration_spacing_mm=registration_spacing_mm, describe=describe)


__all__ = ["MAX_ROTATION_DEG", "MAX_TRANSLATION_MM", "METHODS", "align_to_reference", "align_volumes", "from_sitk",
           "gradient_descent", "isotropic", "mutual_information", "no_finer", "register_rigid", "to_sitk"]
