"""A DICOM study as a segmentable case: the four modalities on the t1ce series' grid.

:func:`load_dicom_case` reads the study (:mod:`~brainscan.dicom.reader`), chooses the t1, t1ce,
t2 and flair series (:mod:`~brainscan.dicom.sequences`), rebuilds each volume with its geometry
(:mod:`~brainscan.dicom.volume`) and brings t1, t2 and flair onto the t1ce grid
(:mod:`~brainscan.dicom.registration`), then extracts the brain when the scans still have the skull on
(:mod:`~brainscan.dicom.skullstrip`). The result has ``channels`` and ``reference`` like a
:class:`~brainscan.data.brats.LoadedCase`, so :func:`brainscan.inference.segmenter.segment_case`
segments it the one way every case is segmented, and the label map lies on the t1ce grid: the
grid of the SEG and of the NIfTI mask that :func:`save_dicom_results` writes.

Skull stripping (``skull_strip="auto"``, the default): the MNI152 template is registered to the t1ce;
a study with no signal outside the template's brain is already skull-stripped and left as it is
(BraTS-like inputs), any other has its brain extracted from the registered template brain, refined
by its intensities. The decision, its measurements and the transform go into ``transforms.json``.

Example:
    >>> case = load_dicom_case("study.zip")
    >>> mask = segment_case(bundle, case)
    >>> save_dicom_results(case, mask, "out/", algorithm=algorithm_identification(bundle.name, bundle.version))
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.dicom.reader import DicomStudy, StudyLimits, check_decodable, read_study
from brainscan.dicom.registration import REFERENCE, align_to_reference
from brainscan.dicom.seg import write_dicom_seg
from brainscan.dicom.sequences import describe, identify_series
from brainscan.dicom.skullstrip import MODES as SKULL_STRIP_MODES
from brainscan.dicom.skullstrip import extract_brain
from brainscan.dicom.volume import SeriesVolume, nifti_volume, series_volume, slice_geometry
from brainscan.io.nifti import Volume, save_like
from brainscan.labels import BRATS2021, MODALITIES

logger = logging.getLogger(__name__)

SEG_FILE = "seg.dcm"
MASK_FILE = "mask.nii.gz"
TRANSFORMS_FILE = "transforms.json"
_DICOM_MAGIC_OFFSET = 128
_SNIFF_FILES = 200
#: A voxel is brain when every channel is brighter there than this fraction of its median over
#: non-zero voxels. Whole-tumour agreement with the NIfTI path varied by less than 0.01 between
#: 0.15 and 0.25 on the test study (BraTS2021_00006 acquired as in tests/dicom/studies.py).
BRAIN_FRACTION = 0.2


@dataclass
class DicomCase:
    """A DICOM study ready to segment.

    Attributes:
        case_id: ``"study-<hash>"``, a short digest of the StudyInstanceUID (never patient data).
        channels: float32 ``(4, X, Y, Z)`` in MODALITIES order on the t1ce grid.
        reference: the t1ce grid as a :class:`~brainscan.io.nifti.Volume` (its data: t1ce).
        reference_series: the t1ce :class:`SeriesVolume` (its instances are the SEG's source).
        series: modality -> the chosen series' summary (UID, number, description, guess).
        transforms: one record per modality of how it reached the t1ce grid
            (see :func:`~brainscan.dicom.registration.align_to_reference`).
        brain: how the brain mask was drawn (``method``, ``fraction``, ``voxels``, ``volume_ml``).
        skull_strip: whether the study was found skull-stripped, what was done, the measurements and
            the template registration (see :func:`~brainscan.dicom.skullstrip.extract_brain`).
    """

    case_id: str
    channels: np.ndarray
    reference: Volume
    reference_series: SeriesVolume
    series: dict[str, dict[str, Any]]
    transforms: list[dict[str, Any]]
    brain: dict[str, Any]
    label_convention: str = BRATS2021
    skull_strip: dict[str, Any] = field(default_factory=dict)


def is_dicom_input(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM study (a zip, or a folder holding DICOM files and no NIfTI).

    A folder with NIfTI files directly inside is a BraTS case folder; a folder is DICOM when one of
    its first files (at any depth) carries the ``DICM`` marker.
    """
    path = Path(path)
    if path.is_file():
        return True
    if not path.is_dir():
        return False
    if any(p.name.lower().endswith((".nii", ".nii.gz")) for p in path.iterdir()):
        return False
    for count, file in enumerate(p for p in path.rglob("*") if p.is_file()):
        if count >= _SNIFF_FILES:
            break
        with file.open("rb") as fh:
            fh.seek(_DICOM_MAGIC_OFFSET)
            if fh.read(4) == b"DICM":
                return True
    return False


def brain_mask(channels: np.ndarray, fraction: float = BRAIN_FRACTION) -> np.ndarray:
    """One brain mask for skull-stripped channels on a common grid.

    Voxels where every channel exceeds ``fraction`` of its median over its non-zero voxels (this
    drops the partial-volume rim), holes filled (dark ventricles inside stay brain), largest
    connected component kept.

    Args:
        channels: ``(C, X, Y, Z)``, 0 outside each series' brain.
        fraction: in ``[0, 1)``.

    Returns:
        bool ``(X, Y, Z)``; all ``True`` if a channel is empty or nothing passes (nothing is cut then).
    """
    from scipy import ndimage as ndi

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    mask = np.ones(channels.shape[1:], dtype=bool)
    for channel in channels:
        nonzero = channel[channel != 0]
        if nonzero.size == 0:
            return np.ones(channels.shape[1:], dtype=bool)
        mask &= channel > fraction * float(np.median(nonzero))
    mask = ndi.binary_fill_holes(mask)
    labels, count = ndi.label(mask)
    if count == 0:
        return np.ones(channels.shape[1:], dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def strip_and_mask(channels: np.ndarray, affine: np.ndarray, *, skull_strip: str = "auto",
                   brain_fraction: float | None = BRAIN_FRACTION) -> tuple[dict[str, Any], dict[str, Any]]:
    """Extract the brain (if the reference channel still has the skull on) and apply :func:`brain_mask`,
    in place, to channels already on the reference (t1ce) grid.

    Args:
        channels: float32 ``(4, X, Y, Z)`` in MODALITIES order on the reference grid (changed in place).
        affine: the reference grid's RAS affine.
        skull_strip: ``"auto"``, ``"on"`` or ``"off"`` (:func:`~brainscan.dicom.skullstrip.extract_brain`).
        brain_fraction: see :func:`brain_mask`; ``None`` keeps every non-zero voxel.

    Returns:
        ``(skull-strip record, brain-mask record)``, both JSON-able.
    """
    head_mask, strip_record = extract_brain(channels[MODALITIES.index(REFERENCE)], affine, mode=skull_strip,
                                            modality=REFERENCE)
    if head_mask is not None:
        channels *= head_mask
    if brain_fraction is None:
        return strip_record, {"method": "none: every non-zero voxel"}
    brain = brain_mask(channels, brain_fraction)
    channels *= brain
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return strip_record, {"method": "every channel above a fraction of its non-zero median; holes filled; largest "
                                    "component", "fraction": brain_fraction, "voxels": int(brain.sum()),
                          "volume_ml": round(float(brain.sum()) * float(np.prod(spacing)) / 1000, 2)}


def check_study(path: str | Path | DicomStudy, series_map: Mapping[str, str] | None = None, *,
                limits: StudyLimits | None = None) -> dict[str, dict[str, Any]]:
    """Check a study from its headers alone (no pixel decoding, no registration): what a service
    does before it queues a job.

    Args:
        path: the study folder or zip, or a study :func:`~brainscan.dicom.reader.read_study` already read.
        series_map: optional ``{SeriesInstanceUID: modality}`` overriding the guess.
        limits: bounds on files and bytes (when ``path`` is read here).

    Returns:
        modality -> the chosen series' summary.

    Raises:
        The errors of :func:`load_dicom_case` that headers reveal: reading, series identification,
        slice geometry (missing, duplicate, unevenly spaced slices; mixed sizes or orientations),
        transfer syntaxes without a decoder.
    """
    study = path if isinstance(path, DicomStudy) else read_study(path, limits=limits)
    chosen = identify_series(study, series_map)
    for series in chosen.values():
        for instance in series.instances:
            check_decodable(instance, series)
        slice_geometry(series)
    mapped = set((series_map or {}).keys())
    return {m: {**describe(s, m), "mapped": s.uid in mapped} for m, s in chosen.items()}


def load_dicom_case(path: str | Path, series_map: Mapping[str, str] | None = None, *, method: str = "rigid",
                    skull_strip: str = "auto", brain_fraction: float | None = BRAIN_FRACTION,
                    limits: StudyLimits | None = None) -> DicomCase:
    """Read a DICOM study and put its four modalities on the t1ce series' grid.

    Args:
        path: the study folder or zip (any folder structure inside).
        series_map: optional ``{SeriesInstanceUID: modality}`` overriding the guess.
        method: ``"rigid"`` (register t1, t2, flair to t1ce) or ``"geometry"`` (resample by the DICOM
            geometry only).
        skull_strip: ``"auto"`` (extract the brain unless the study is already skull-stripped),
            ``"on"`` (always) or ``"off"`` (take the study as skull-stripped); see
            :func:`~brainscan.dicom.skullstrip.extract_brain`.
        brain_fraction: see :func:`brain_mask`; ``None`` keeps every non-zero voxel.
        limits: bounds on files and bytes.

    Returns:
        The :class:`DicomCase`.

    Raises:
        The errors of :func:`~brainscan.dicom.reader.read_study`,
        :func:`~brainscan.dicom.sequences.identify_series` and
        :func:`~brainscan.dicom.volume.series_volume` and
        :func:`~brainscan.dicom.skullstrip.extract_brain` (all :class:`~brainscan.errors.BrainscanError`);
        ValueError for an unknown ``method`` or ``skull_strip``.
    """
    if skull_strip not in SKULL_STRIP_MODES:
        raise ValueError(f"skull_strip must be one of {SKULL_STRIP_MODES}, got {skull_strip!r}")
    study = read_study(path, limits=limits)
    chosen = identify_series(study, series_map)
    volumes = {modality: series_volume(series) for modality, series in chosen.items()}
    channels, transforms = align_to_reference(volumes, method=method)
    reference_series = volumes[REFERENCE]
    strip_record, brain_info = strip_and_mask(channels, reference_series.affine, skull_strip=skull_strip,
                                              brain_fraction=brain_fraction)
    mapped = set((series_map or {}).keys())
    summaries = {m: {**describe(s, m), "mapped": s.uid in mapped} for m, s in chosen.items()}
    for modality in MODALITIES:
        summaries[modality].update(shape=list(volumes[modality].shape),
                                   spacing_mm=[round(v, 4) for v in volumes[modality].spacing])
    digest = hashlib.sha256(study.study_uid.encode()).hexdigest()[:12]
    return DicomCase(case_id=f"study-{digest}", channels=channels,
                     reference=nifti_volume(reference_series.data, reference_series.affine),
                     reference_series=reference_series, series=summaries, transforms=transforms, brain=brain_info,
                     skull_strip=strip_record)


def save_dicom_results(case: DicomCase, mask: np.ndarray, out_dir: str | Path, *, algorithm: Any,
                       save_volumes: bool = False) -> dict[str, str]:
    """Write the SEG, the NIfTI mask (both on the t1ce grid) and the transforms of a segmented case.

    Args:
        case: the segmented :class:`DicomCase`.
        mask: uint8 BraTS labels ``(X, Y, Z)`` on the t1ce grid (from ``segment_case``).
        out_dir: folder to write into (created).
        algorithm: :func:`~brainscan.dicom.seg.algorithm_identification` of the model.
        save_volumes: also write the four volumes on the t1ce grid as ``<modality>.nii.gz``.

    Returns:
        ``{"seg", "mask", "transforms", and each modality if saved}`` -> file path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seg = str(write_dicom_seg(mask, case.reference_series, out / SEG_FILE, algorithm=algorithm))
    record = {"reference": REFERENCE, "series": case.series, "transforms": case.transforms,
              "skull_strip": case.skull_strip, "brain_mask": case.brain}
    return {"seg": seg, **write_aligned_outputs(case.reference, case.channels, mask, record, out,
                                                save_volumes=save_volumes)}


def write_aligned_outputs(reference: Volume, channels: np.ndarray, mask: np.ndarray, record: Mapping[str, Any],
                          out_dir: str | Path, *, save_volumes: bool = False) -> dict[str, str]:
    """Write a case aligned to the reference grid: ``mask.nii.gz`` on that grid, ``transforms.json``
    (``record``) and, if asked, the channels as ``<modality>.nii.gz``.

    Returns:
        ``{"mask", "transforms", and each modality if saved}`` -> file path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"mask": str(save_like(mask, reference, out / MASK_FILE))}
    (out / TRANSFORMS_FILE).write_text(json.dumps(dict(record), indent=2) + "\n")
    written["transforms"] = str(out / TRANSFORMS_FILE)
    if save_volumes:
        for index, modality in enumerate(MODALITIES):
            written[modality] = str(save_like(channels[index], reference, out / f"{modality}.nii.gz", dtype=np.float32))
    return written


__all__ = ["BRAIN_FRACTION", "MASK_FILE", "SEG_FILE", "TRANSFORMS_FILE", "DicomCase", "brain_mask", "check_study",
           "is_dicom_input", "load_dicom_case", "save_dicom_results", "strip_and_mask", "write_aligned_outputs"]
