"""NIfTI cases whose four modalities are not on one grid: checked, then brought onto the t1ce grid.

A NIfTI upload straight from a scanner's converter has each modality on its own grid (its own
orientation, slice spacing and field of view). The volumes' affines place them in one world
(scanner) frame, so they give the starting alignment; t1, t2 and flair are then registered rigidly
to t1ce and resampled onto its grid, and the brain is extracted when the scans still have the skull
on: the steps of the DICOM path (:func:`brainscan.dicom.registration.align_volumes`,
:func:`brainscan.dicom.case.strip_and_mask`), with every transform recorded in ``transforms.json``.

The header-level checks (:func:`on_one_grid`, :func:`check_overlap`) need only shapes and affines,
so a service runs them before it queues a job; they import neither SimpleITK nor pydicom.

Example:
    >>> grids = {m: (v.shape, v.affine) for m, v in volumes.items()}
    >>> check_overlap(grids)                         # 422 no_overlap when a volume lies elsewhere
    >>> case = align_nifti_case(volumes)             # channels (4, *t1ce grid), transforms
    >>> save_aligned_results(case, segment_case(bundle, case), "out/")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brainscan.data.brats import AFFINE_ATOL_MM
from brainscan.errors import VolumeMismatchError
from brainscan.io.nifti import Volume
from brainscan.labels import BRATS2021, MODALITIES

REFERENCE = "t1ce"
#: a volume must cover at least this fraction of the smaller of its and the t1ce's world extent
#: (their bounding boxes): series of one brain share most of it, whatever their field of view
MIN_OVERLAP = 0.25
#: Rigid alignment (DICOM studies, NIfTI uploads) runs on copies no finer than this spacing on any axis
#: (thick slices keep their thickness); the skull stripper's template registration on isotropic copies at
#: it. `bench/registration.py` (a real BraTS case acquired with 0.9 mm pixels and 3-5 mm slices, one core,
#: 2026-12-07): t1, t2 and flair in 4.6 s at 2 mm against 23.9 s on the series' own grids, with t2's known
#: movement found about as closely (largest error at the brain's corners 1.35 mm against 1.10 mm); at 3 mm
#: the error grows to 1.9 mm.
REGISTRATION_SPACING_MM = 2.0

Grid = tuple[Sequence[int], np.ndarray]


def on_one_grid(grids: Mapping[str, Grid], atol_mm: float = AFFINE_ATOL_MM) -> bool:
    """Whether every ``(shape, affine)`` has the same 3D shape and an affine within ``atol_mm``."""
    items = list(grids.values())
    shape0, affine0 = tuple(items[0][0][:3]), np.asarray(items[0][1], dtype=np.float64)
    return all(tuple(shape[:3]) == shape0 and float(np.max(np.abs(np.asarray(affine) - affine0))) <= atol_mm
               for shape, affine in items[1:])


def world_extent(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest world (RAS, mm) coordinates of a grid's voxel boxes: its bounding box."""
    corners = np.array([[x, y, z, 1.0] for x in (-0.5, shape[0] - 0.5) for y in (-0.5, shape[1] - 0.5)
                        for z in (-0.5, shape[2] - 0.5)])
    world = (np.asarray(affine, dtype=np.float64) @ corners.T).T[:, :3]
    return world.min(axis=0), world.max(axis=0)


def overlap_fraction(a: Grid, b: Grid) -> float:
    """The shared volume of two grids' bounding boxes, as a fraction of the smaller box (0 to 1)."""
    (low_a, high_a), (low_b, high_b) = world_extent(a[0], a[1]), world_extent(b[0], b[1])
    shared = float(np.prod(np.clip(np.minimum(high_a, high_b) - np.maximum(low_a, low_b), 0.0, None)))
    smaller = min(float(np.prod(high_a - low_a)), float(np.prod(high_b - low_b)))
    return shared / smaller if smaller > 0 else 0.0


def check_overlap(grids: Mapping[str, Grid], names: Mapping[str, str] | None = None, *,
                  reference: str = REFERENCE, min_fraction: float = MIN_OVERLAP) -> dict[str, float]:
    """Refuse volumes that do not lie on the reference's anatomy in world space.

    Args:
        grids: ``{modality: (shape, affine)}``, the affines in one world frame.
        names: modality -> file name for messages.
        reference: the modality the others are aligned to.
        min_fraction: least :func:`overlap_fraction` with the reference.

    Returns:
        modality -> its overlap fraction with the reference.

    Raises:
        VolumeMismatchError: (422 ``no_overlap``) a volume whose extent barely meets, or misses, the
            reference's; its affine is not in the same world frame, so no alignment can be trusted.
    """
    names = names or {}
    fractions = {m: round(overlap_fraction(grid, grids[reference]), 4) for m, grid in grids.items() if m != reference}
    for modality, fraction in fractions.items():
        if fraction < min_fraction:
            low, high = world_extent(*grids[modality])
            ref_low, ref_high = world_extent(*grids[reference])
            raise VolumeMismatchError(
                f"{modality} ({names.get(modality, modality)}) covers {fraction:.0%} of the space {reference} covers "
                f"(world extent {np.round(low, 1).tolist()} to {np.round(high, 1).tolist()} mm, {reference} "
                f"{np.round(ref_low, 1).tolist()} to {np.round(ref_high, 1).tolist()} mm; at least "
                f"{min_fraction:.0%} is needed): the volumes are not of one head in one scanner frame; upload the "
                "four series of one session with their original headers", code="no_overlap")
    return fractions


def grid_summary(shape: Sequence[int], affine: np.ndarray) -> dict[str, Any]:
    """``{"shape", "spacing_mm", "orientation"}`` of a grid, JSON-able."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return {"shape": [int(s) for s in shape[:3]], "spacing_mm": [round(float(s), 6) for s in spacing],
            "orientation": "".join(nib.aff2axcodes(affine))}


@dataclass
class AlignedCase:
    """A NIfTI case on the t1ce grid, ready for :func:`brainscan.inference.segmenter.segment_case`.

    Attributes:
        case_id: the case's name.
        channels: float32 ``(4, X, Y, Z)`` in MODALITIES order on the t1ce grid.
        reference: the t1ce volume (its grid, affine and header: where the mask is written).
        inputs: modality -> the uploaded grid (:func:`grid_summary`).
        transforms: one record per modality (see :func:`~brainscan.dicom.registration.align_volumes`).
        brain: how the brain mask was drawn. skull_strip: what brain extraction decided and why.
    """

    case_id: str
    channels: np.ndarray
    reference: Volume
    inputs: dict[str, dict[str, Any]]
    transforms: list[dict[str, Any]]
    brain: dict[str, Any]
    label_convention: str = BRATS2021
    skull_strip: dict[str, Any] = field(default_factory=dict)


def align_nifti_case(volumes: Mapping[str, Volume], *, case_id: str = "case", method: str = "rigid",
                     skull_strip: str = "auto", brain_fraction: float | None = 0.2,
                     registration_spacing_mm: float | None = REGISTRATION_SPACING_MM,
                     names: Mapping[str, str] | None = None) -> AlignedCase:
    """Bring four NIfTI volumes, each on its own grid, onto the t1ce grid (the DICOM path's steps).

    Args:
        volumes: ``{modality: Volume}`` for the four MODALITIES (3D, or 4D with one frame).
        case_id: the case's name.
        method: ``"rigid"`` (register t1, t2, flair to t1ce, starting from the affines) or
            ``"geometry"`` (resample by the affines alone).
        skull_strip: ``"auto"``, ``"on"`` or ``"off"`` (:func:`~brainscan.dicom.skullstrip.extract_brain`).
        brain_fraction: see :func:`brainscan.dicom.case.brain_mask` (the DICOM path's default, 0.2);
            ``None`` keeps every non-zero voxel (voxels where a modality does not reach are 0).
        registration_spacing_mm: see :func:`~brainscan.dicom.registration.align_volumes`.
        names: modality -> file name, kept in ``inputs``.

    Returns:
        The :class:`AlignedCase`.

    Raises:
        VolumeMismatchError: (``no_overlap``) see :func:`check_overlap`. The errors of
        :func:`~brainscan.dicom.skullstrip.extract_brain`; ValueError for an unknown option.
    """
    from brainscan.dicom.case import strip_and_mask
    from brainscan.dicom.registration import align_volumes

    arrays = {m: (v.data[..., 0] if v.data.ndim == 4 else v.data) for m, v in volumes.items()}
    grids = {m: (arrays[m].shape, volumes[m].affine) for m in MODALITIES}
    check_overlap(grids, names)
    channels, transforms = align_volumes({m: (arrays[m], volumes[m].affine) for m in MODALITIES}, method=method,
                                         same_frame=True, registration_spacing_mm=registration_spacing_mm,
                                         describe={m: {"file": (names or {}).get(m, m)} for m in MODALITIES})
    reference = volumes[REFERENCE]
    strip_record, brain_info = strip_and_mask(channels, reference.affine, skull_strip=skull_strip,
                                              brain_fraction=brain_fraction)
    inputs = {m: {**grid_summary(*grids[m]), "file": (names or {}).get(m, m)} for m in MODALITIES}
    return AlignedCase(case_id=case_id, channels=channels,
                       reference=Volume(arrays[REFERENCE], reference.affine, reference.header, reference.path),
                       inputs=inputs, transforms=transforms, brain=brain_info, skull_strip=strip_record)


def save_aligned_results(case: AlignedCase, mask: np.ndarray, out_dir: str | Path, *,
                         save_volumes: bool = False) -> dict[str, str]:
    """Write the mask (on the t1ce grid and affine) and ``transforms.json`` of a segmented case.

    Args:
        case: the segmented :class:`AlignedCase`.
        mask: uint8 labels ``(X, Y, Z)`` on the t1ce grid.
        out_dir: folder to write into (created).
        save_volumes: also write the four volumes on the t1ce grid as ``<modality>.nii.gz``.

    Returns:
        ``{"mask", "transforms", and each modality if saved}`` -> file path.
    """
    from brainscan.dicom.case import write_aligned_outputs

    record = {"reference": REFERENCE, "inputs": case.inputs, "transforms": case.transforms,
              "skull_strip": case.skull_strip, "brain_mask": case.brain}
    return write_aligned_outputs(case.reference, case.channels, mask, record, out_dir, save_volumes=save_volumes)


__all__ = ["MIN_OVERLAP", "REGISTRATION_SPACING_MM", "AlignedCase", "align_nifti_case", "check_overlap",
           "grid_summary", "on_one_grid", "overlap_fraction", "save_aligned_results", "world_extent"]
