"""Brain extraction for scans with the skull on, with no weights: the MNI152 brain mask, registered.

The MNI ICBM152 2009a T1 template and its brain that ship inside nilearn's wheel
(:func:`brainscan.data.phantoms.anatomy.load_template`, read offline) are registered to the
patient's scan with SimpleITK: a similarity transform (rotation, translation, one scale; started
from two sizes, the better fit kept), then a full affine, both with Mattes mutual information on
2 mm copies of the two images, the metric sampled only in the template's brain and a rim around it
(so the brain's edge against the dark CSF and skull drives the fit, and the scalp, face and neck
do not). The template's brain is carried
onto the patient's grid through that transform and refined by the patient's own intensities:
a voxel near the warped edge stays brain only if it is not dark (CSF and bone are dark on T1),
the brain's core always stays, holes are filled and the largest component is kept.

Whether a scan is already skull-stripped is read from the same registration: a stripped scan has
(almost) no signal outside the template's brain, a scan with the skull on has the scalp, skull
marrow, face and neck there. ``"auto"`` strips only scans that are not stripped, so BraTS-like
inputs are left alone. Every decision, measurement and transform is returned as a JSON-able record.

Example:
    >>> mask, record = extract_brain(t1ce, affine, mode="auto")
    >>> record["decision"]                    # "stripped here" or "already skull-stripped"
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import numpy as np

from brainscan.dicom.registration import from_sitk, gradient_descent, isotropic, mutual_information, to_sitk
from brainscan.errors import BrainscanError
from brainscan.preprocess.align import REGISTRATION_SPACING_MM

logger = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
#: auto: a scan is already stripped when the signal outside the template's brain (dilated by
#: :data:`OUTSIDE_MARGIN_MM`) is below this fraction of the signal inside it.
STRIPPED_OUTSIDE_RATIO = 0.05
OUTSIDE_MARGIN_MM = 10.0
#: Signal: voxels brighter than this fraction of the median inside the warped brain.
SIGNAL_FRACTION = 0.1
#: Refinement: the warped brain, grown by this margin, is where brain may be; shrunk by
#: :data:`CORE_MARGIN_MM`, it is brain whatever its intensity (dark necrosis, ventricles).
SEARCH_MARGIN_MM = 4.0
CORE_MARGIN_MM = 6.0
#: Refinement: a voxel between the core and the search margin is brain when brighter than this
#: fraction of the core's median (CSF and bone are darker on T1 and T1ce).
DARK_FRACTION = 0.35
#: A registration whose affine scales an axis outside this range (head sizes differ by far less)
#: went astray.
SCALE_RANGE = (0.7, 1.4)
#: The similarity stage starts from these template scales (see :func:`register_template`).
START_SCALES = (0.85, 1.0)
_SEED = 20261203
#: Fraction of the template's masked voxels the metric samples at 8, 4 and 2 mm (seeded, so results
#: repeat). Coarse levels have few voxels: sampling them all keeps the search out of false optima.
SAMPLING = (1.0, 0.5, 0.25)
_SHRINK = (4, 2, 1)
_SMOOTHING_MM = (4.0, 2.0, 0.0)


@lru_cache(maxsize=1)
def template_images() -> tuple[Any, Any]:
    """The ICBM152 2009a T1 (skull-stripped, in [0, 1]) and its brain fraction, at 2 mm, as SimpleITK
    images in LPS space. Read from nilearn's wheel once per process."""
    import SimpleITK as sitk

    from brainscan.data.phantoms.anatomy import load_template

    template = load_template()
    factor = [int(round(REGISTRATION_SPACING_MM))] * 3
    t1 = sitk.BinShrink(to_sitk(template.t1, template.affine), factor)
    brain = sitk.BinShrink(to_sitk(template.brain.astype(np.float32), template.affine), factor)
    return t1, brain


def _method(fixed_mask: Any, iterations: int, levels: slice) -> Any:
    """Mutual information sampled in ``fixed_mask``, optimised over ``levels`` of the 8, 4, 2 mm pyramid."""
    method = gradient_descent(mutual_information(SAMPLING[levels], _SEED), learning_rate=1.0, iterations=iterations,
                              shrink=_SHRINK[levels], smoothing_mm=_SMOOTHING_MM[levels])
    method.SetMetricFixedMask(fixed_mask)
    return method


def _affine_matrix(transform: Any) -> np.ndarray:
    """4x4 LPS matrix of an ITK matrix-offset transform (template point -> patient point)."""
    matrix = np.eye(4)
    linear = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), dtype=np.float64)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.asarray(transform.GetTranslation(), dtype=np.float64) + center - linear @ center
    return matrix


def _start(fixed: Any, moving: Any) -> Any:
    """Similarity transform that puts the template brain's centre on the patient's brain's likely centre.

    The head's centre of mass lies below and in front of the brain's when the face and neck are in
    the field of view, so the patient's centre is taken from the signal in the top 60 % of its
    superior-inferior extent (the part of a head that is mostly brain).
    """
    import SimpleITK as sitk

    data = from_sitk(moving)
    signal = data > SIGNAL_FRACTION * float(np.percentile(data[data > 0], 98)) if np.any(data > 0) else data > 0
    points = np.argwhere(signal)
    start = sitk.Similarity3DTransform()
    fixed_centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in np.argwhere(from_sitk(fixed) > 0.5).mean(axis=0)]))
    start.SetCenter(fixed_centre.tolist())
    if len(points) == 0:
        return start
    direction = np.asarray(moving.GetDirection(), dtype=np.float64).reshape(3, 3)
    physical = (points * np.asarray(moving.GetSpacing())) @ direction.T + np.asarray(moving.GetOrigin())
    superior = physical[:, 2]  # LPS: +z is superior
    top = physical[superior >= superior.max() - 0.6 * (superior.max() - superior.min())]
    start.SetTranslation((top.mean(axis=0) - fixed_centre).tolist())
    return start


def register_template(moving: Any, *, iterations: int = 200) -> tuple[Any, dict[str, Any]]:
    """Register the template to ``moving`` (a SimpleITK image, LPS): similarity, then affine.

    The similarity stage runs at 8 and 4 mm from each of :data:`START_SCALES` and keeps the best
    metric: started at the template's own size, it can settle on the wrong optimum where the brain
    is stretched over the whole head (scalp for cortex); started smaller, it meets the brain's edge
    first. The affine stage then refines the best one at 4 and 2 mm.

    Args:
        moving: the patient's scan at :data:`REGISTRATION_SPACING_MM` (:func:`isotropic`).
        iterations: most optimizer steps per resolution level and stage.

    Returns:
        ``(transform, record)``: an ITK affine transform mapping template points to patient points,
        and its record (stages, metric values, the 4x4 LPS matrix, per-axis scales, whether it is
        plausible and, if not, why).
    """
    import SimpleITK as sitk

    template, brain = template_images()
    rim = int(np.ceil(8.0 / REGISTRATION_SPACING_MM))
    fixed_mask = sitk.BinaryDilate(sitk.Cast(brain > 0.5, sitk.sitkUInt8), [rim] * 3)
    start = _start(template, moving)
    tried = []
    for scale in START_SCALES:
        initial = sitk.Similarity3DTransform(start)
        initial.SetScale(scale)
        similarity = _method(fixed_mask, iterations, slice(0, 2))
        similarity.SetInitialTransform(initial, inPlace=False)
        result = sitk.Similarity3DTransform(_only(similarity.Execute(template, moving)))
        tried.append((float(similarity.GetMetricValue()), result,
                      {**_stage("similarity", similarity), "start_scale": scale, "scale": round(result.GetScale(), 4)}))
    found = min(tried, key=lambda item: item[0])[1]
    stages = [record for _, _, record in tried]
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(found.GetMatrix())
    affine.SetCenter(found.GetCenter())
    affine.SetTranslation(found.GetTranslation())
    affine_method = _method(fixed_mask, iterations, slice(1, 3))
    affine_method.SetInitialTransform(affine, inPlace=False)
    final = sitk.AffineTransform(_only(affine_method.Execute(template, moving)))
    stages.append(_stage("affine", affine_method))
    matrix = _affine_matrix(final)
    scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    reason = None
    if not (SCALE_RANGE[0] <= scales.min() and scales.max() <= SCALE_RANGE[1]):
        reason = (f"the template-to-patient affine scales by {scales.min():.2f}-{scales.max():.2f}, outside "
                  f"{SCALE_RANGE[0]}-{SCALE_RANGE[1]}: the registration went astray")
    record = {
        "template": "MNI ICBM152 2009a nonlinear symmetric T1 and brain (nilearn's wheel), 2 mm",
        "metric": "Mattes mutual information (32 bins), sampled in the template brain and an 8 mm rim",
        "grid_mm": REGISTRATION_SPACING_MM, "seed": _SEED, "stages": stages,
        "matrix_lps": matrix.tolist(), "meaning": "template LPS point -> patient LPS point",
        "scales": [round(float(s), 4) for s in scales], "plausible": reason is None, "rejected_because": reason,
    }
    return final, record


def _only(result: Any) -> Any:
    import SimpleITK as sitk

    return sitk.CompositeTransform(result).GetNthTransform(0) if isinstance(result, sitk.CompositeTransform) \
        else result


def _stage(name: str, method: Any) -> dict[str, Any]:
    return {"stage": name, "iterations": int(method.GetOptimizerIteration()),
            "metric": float(method.GetMetricValue()), "stop_condition": method.GetOptimizerStopConditionDescription()}


def warp_brain(transform: Any, reference: Any) -> np.ndarray:
    """The template's brain fraction resampled onto ``reference``'s grid through ``transform``
    (template -> patient), float32 ``(X, Y, Z)`` in [0, 1]."""
    import SimpleITK as sitk

    _, brain = template_images()
    warped = sitk.Resample(brain, reference, transform.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return from_sitk(warped)


def _distance_outside(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in mm from each voxel outside ``mask`` to it (0 inside)."""
    from scipy import ndimage as ndi

    return ndi.distance_transform_edt(~mask, sampling=spacing) if mask.any() else np.full(mask.shape, np.inf)


def _distance_inside(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in mm from each voxel of ``mask`` to the nearest voxel outside it (0 outside)."""
    from scipy import ndimage as ndi

    return ndi.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]


def refine(warped: np.ndarray, intensity: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The brain from the warped template brain and the patient's intensities.

    Args:
        warped: the template's brain fraction on the patient's grid (:func:`warp_brain`).
        intensity: the patient's scan on the same grid (T1-weighted: CSF and bone dark).
        spacing: voxel size in mm.

    Returns:
        bool ``(X, Y, Z)``: the core (warped brain shrunk by :data:`CORE_MARGIN_MM`), plus the voxels
        within :data:`SEARCH_MARGIN_MM` of the warped brain brighter than :data:`DARK_FRACTION` of
        the core's median; holes filled, largest connected component.
    """
    from scipy import ndimage as ndi

    spacing_arr = np.asarray(spacing, dtype=np.float64)
    brain = warped >= 0.5
    core = _distance_inside(brain, spacing_arr) > CORE_MARGIN_MM
    search = _distance_outside(brain, spacing_arr) <= SEARCH_MARGIN_MM
    inside = intensity[core] if core.any() else intensity[brain]
    if inside.size == 0:
        return brain
    mask = core | (search & (intensity > DARK_FRACTION * float(np.median(inside))))
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask) | core)
    labels, count = ndi.label(mask)
    if count == 0:
        return brain
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def stripped_statistics(intensity: np.ndarray, warped: np.ndarray,
                        spacing: tuple[float, float, float]) -> dict[str, Any]:
    """How much signal lies outside the warped template brain (``intensity`` and ``warped`` on one grid).

    Returns:
        ``outside_ratio`` (signal voxels farther than :data:`OUTSIDE_MARGIN_MM` from the warped
        brain, over signal voxels in it), ``zero_fraction`` (voxels exactly 0) and the thresholds.
    """
    brain = warped >= 0.5
    inside = intensity[brain]
    level = SIGNAL_FRACTION * float(np.median(inside[inside > 0])) if np.any(inside > 0) else 0.0
    signal = intensity > level
    near = _distance_outside(brain, np.asarray(spacing, dtype=np.float64)) <= OUTSIDE_MARGIN_MM
    signal_inside = int(np.count_nonzero(signal & brain))
    outside = int(np.count_nonzero(signal & ~near))
    return {"outside_ratio": round(outside / max(signal_inside, 1), 4), "signal_level": level,
            "outside_margin_mm": OUTSIDE_MARGIN_MM, "zero_fraction": round(float(np.mean(intensity == 0)), 4),
            "threshold": STRIPPED_OUTSIDE_RATIO}


def extract_brain(intensity: np.ndarray, affine: np.ndarray, *, mode: str = "auto",
                modality: str = "t1ce") -> tuple[np.ndarray | None, dict[str, Any]]:
    """Detect whether a scan is skull-stripped and, if asked or needed, extract its brain.

    Args:
        intensity: the scan ``(X, Y, Z)`` (T1-weighted, e.g. t1ce), 0 where nothing was imaged.
        affine: its RAS voxel-to-world matrix.
        mode: ``"auto"`` (strip unless already stripped), ``"on"`` (strip) or ``"off"`` (do nothing).
        modality: which modality ``intensity`` is (for the record).

    Returns:
        ``(mask, record)``: bool ``(X, Y, Z)`` brain mask to multiply every channel by, or ``None``
        when nothing is to be stripped; ``record`` says what was decided and why, with the
        measurements and the registration.

    Raises:
        ValueError: an unknown ``mode``.
        BrainscanError (``skull_strip_failed``): the template registration went astray and the scan
            does not look stripped (its background is not empty), so neither stripping nor
            leaving it is safe.
    """
    if mode not in MODES:
        raise ValueError(f"skull-strip mode must be one of {MODES}, got {mode!r}")
    record: dict[str, Any] = {"mode": mode, "modality": modality}
    if mode == "off":
        return None, {**record, "decision": "not checked (off): the input is taken as skull-stripped"}
    import time

    started = time.perf_counter()
    image = to_sitk(intensity, affine)
    moving = isotropic(image)
    transform, registration = register_template(moving)
    # Detection on the 2 mm copy (the margins' distance maps cost little there).
    statistics = stripped_statistics(from_sitk(moving), warp_brain(transform, moving), (REGISTRATION_SPACING_MM,) * 3)
    statistics["zero_fraction"] = round(float(np.mean(intensity == 0)), 4)
    record.update(statistics=statistics, registration=registration)
    looks_stripped = statistics["outside_ratio"] < STRIPPED_OUTSIDE_RATIO
    if not registration["plausible"]:
        if mode == "auto" and statistics["zero_fraction"] >= 0.3:
            record["decision"] = ("already skull-stripped (template registration failed; the background is empty, "
                                  "so the scan is left as it is)")
            return None, record
        raise BrainscanError(f"skull stripping failed: {registration['rejected_because']}. If the study is already "
                             "skull-stripped, turn skull stripping off", code="skull_strip_failed")
    if mode == "auto" and looks_stripped:
        record.update(decision="already skull-stripped: left as it is", seconds=round(time.perf_counter() - started, 2))
        logger.info("skull stripping (auto): already skull-stripped")
        return None, record
    spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    warped = warp_brain(transform, image)
    mask = refine(warped, intensity, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    record.update(decision="stripped here", method=(
        "template brain warped by the affine; grown by "
        f"{SEARCH_MARGIN_MM} mm and kept where brighter than {DARK_FRACTION} of the core's median; core (shrunk by "
        f"{CORE_MARGIN_MM} mm) always kept; holes filled; largest component"),
        volume_ml=round(float(mask.sum()) * voxel_ml, 1),
        warped_volume_ml=round(float((warped >= 0.5).sum()) * voxel_ml, 1),
        seconds=round(time.perf_counter() - started, 2))
    if mode == "auto" and not looks_stripped:
        record["reason"] = (f"signal outside the template brain is {statistics['outside_ratio']:.2f} of the signal "
                            f"inside (stripped scans: below {STRIPPED_OUTSIDE_RATIO})")
    logger.info("skull stripping (%s): %s", mode, record["decision"])
    return mask, record


__all__ = ["MODES", "isotropic", "refine", "register_template", "extract_brain", "stripped_statistics",
           "template_images", "warp_brain"]
