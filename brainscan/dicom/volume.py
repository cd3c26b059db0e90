"""Rebuild one DICOM MR series as a 3D volume with its true geometry, after checking it is one.

Geometry (DICOM PS3.3 C.7.6.2, Image Plane module): the pixel in column ``i`` and row ``j`` of a
slice lies at ``ImagePositionPatient + i * dc * row_cosine + j * dr * column_cosine`` in patient
coordinates (LPS: x to the patient's left, y posterior, z superior), where ``ImageOrientationPatient``
holds the row and column cosines and ``PixelSpacing`` is ``(dr, dc)`` (between rows, between
columns). Slices are ordered along the normal ``row_cosine x column_cosine``; the third affine
column is the step between neighbouring slices. NIfTI is RAS, so the LPS affine is flipped in x
and y. The array is ``(columns, rows, slices)``: voxel ``(i, j, k)`` is that pixel of slice ``k``.

A series is one volume only if every slice has the same size, pixel spacing and orientation, no
two slices share a position, and the slices are evenly spaced along the normal; each failure has
its own :class:`~brainscan.errors.InconsistentSeriesError` code and message.

Example:
    >>> volume = series_volume(study.series[uid])
    >>> volume.data.shape, volume.spacing            # e.g. ((256, 256, 48), (0.9, 0.9, 3.0))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from brainscan.dicom.reader import DicomSeries, check_decodable
from brainscan.errors import CorruptFileError, InconsistentSeriesError, UnsupportedFormatError
from brainscan.io.nifti import Volume

logger = logging.getLogger(__name__)

#: LPS (DICOM patient coordinates) <-> RAS (NIfTI world coordinates); its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Fewest slices that make a volume; fewer is a localizer or a single image.
MIN_SLICES = 3
#: Cosines that differ by less than this are the same orientation (~0.06 degrees).
ORIENTATION_TOL = 1e-3
#: Tolerance on slice steps, as a fraction of the median step (with an absolute floor in mm).
SPACING_REL_TOL = 0.02
SPACING_ABS_TOL_MM = 0.01


@dataclass
class SeriesVolume:
    """One reconstructed series.

    Attributes:
        data: float32 ``(columns, rows, slices)``, rescaled (RescaleSlope/Intercept applied).
        affine: 4x4 voxel-to-world matrix in RAS (NIfTI convention), millimetres.
        instances: the headers (no pixel data) in slice order: ``instances[k]`` is slice ``k``.
        series: the :class:`DicomSeries` it was built from.
    """

    data: np.ndarray
    affine: np.ndarray
    instances: list[Dataset]
    series: DicomSeries

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def lps_affine(self) -> np.ndarray:
        return LPS_TO_RAS @ self.affine

    def to_volume(self, data: np.ndarray | None = None) -> Volume:
        """A :class:`~brainscan.io.nifti.Volume` on this grid (for ``save_like`` and ``segment_case``)."""
        return nifti_volume(self.data if data is None else data, self.affine)


def nifti_volume(data: np.ndarray, affine: np.ndarray) -> Volume:
    """Wrap an array and a RAS affine as a :class:`Volume` with a matching NIfTI header."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_zooms(tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    return Volume(data=data, affine=np.asarray(affine, dtype=np.float64), header=header)


def _floats(header: Dataset, keyword: str, count: int, where: str) -> np.ndarray:
    value = header.get(keyword)
    try:
        values = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (count,) or not np.isfinite(values).all():
        raise InconsistentSeriesError(f"{where} lacks a valid {keyword} ({count} numbers); the series has no "
                                      "usable geometry", code="missing_geometry")
    return values


def _check_same(series: DicomSeries, values: list, what: str, same) -> None:
    """Raise ``mixed_geometry`` if the slices disagree on ``what``."""
    first = values[0]
    odd = [index for index, value in enumerate(values) if not same(value, first)]
    if odd:
        found = sorted({str(v) for v in values})[:4]
        raise InconsistentSeriesError(
            f"{series.label} mixes slices of different {what} ({len(odd)} of {len(values)} differ from the first; "
            f"values {found}); one series must be one volume: export each acquisition as its own series",
            code="mixed_geometry")


def slice_geometry(series: DicomSeries) -> tuple[list[Dataset], np.ndarray]:
    """Check a series' slices and put them in order along the slice normal.

    Returns:
        ``(headers in slice order, lps_affine)``: the 4x4 voxel-to-LPS matrix.

    Raises:
        InconsistentSeriesError: codes ``too_few_slices``, ``missing_geometry``, ``mixed_geometry``
            (sizes, pixel spacings or orientations differ), ``duplicate_slices``,
            ``missing_slices``, ``uneven_spacing``, ``misaligned_slices`` (slices off the normal line).
    """
    headers = [instance.header for instance in series.instances]
    if len(headers) < MIN_SLICES:
        raise InconsistentSeriesError(f"{series.label} has {len(headers)} slice(s); a volume needs at least "
                                      f"{MIN_SLICES}", code="too_few_slices")
    _check_same(series, [(int(h.get("Rows", 0)), int(h.get("Columns", 0))) for h in headers],
                "sizes (rows, columns)", lambda a, b: a == b)
    where = [f"{series.label} slice {h.get('InstanceNumber', '?')}" for h in headers]
    spacings = [_floats(h, "PixelSpacing", 2, w) for h, w in zip(headers, where)]
    _check_same(series, spacings, "pixel spacings", lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-4))
    orientations = [_floats(h, "ImageOrientationPatient", 6, w) for h, w in zip(headers, where)]
    _check_same(series, orientations, "orientations", lambda a, b: np.allclose(a, b, atol=ORIENTATION_TOL))
    positions = np.stack([_floats(h, "ImagePositionPatient", 3, w) for h, w in zip(headers, where)])

    row_cosine, column_cosine = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_cosine, column_cosine)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3) or abs(row_cosine @ column_cosine) > 1e-3:
        raise InconsistentSeriesError(f"{series.label} has an ImageOrientationPatient whose cosines are not "
                                      "orthonormal", code="missing_geometry")
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    distance, positions = distance[order], positions[order]
    headers = [headers[i] for i in order]
    steps = np.diff(distance)
    if steps.size and steps.min() < SPACING_ABS_TOL_MM:
        at = int(np.argmin(steps))
        numbers = sorted(str(headers[i].get("InstanceNumber", "?")) for i in (at, at + 1))
        raise InconsistentSeriesError(
            f"{series.label} holds {int((steps < SPACING_ABS_TOL_MM).sum())} slice(s) at a position another slice "
            f"already has (first at {distance[at]:.2f} mm along the normal: instance numbers {' and '.join(numbers)}); "
            "a series holds one slice per position: export repeated or multi-echo acquisitions as separate series",
            code="duplicate_slices")
    step = float(np.median(steps))
    tolerance = max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * step)
    bad = np.flatnonzero(np.abs(steps - step) > tolerance)
    if bad.size:
        gap = steps[bad[0]]
        ratio = gap / step
        if ratio > 1.5 and abs(ratio - round(ratio)) * step <= tolerance:
            missing = int(sum(round(steps[b] / step) - 1 for b in bad))
            raise InconsistentSeriesError(
                f"{series.label} lacks {missing} slice(s): a gap of {gap:.2f} mm between positions "
                f"{distance[bad[0]]:.2f} and {distance[bad[0] + 1]:.2f} mm where slices are {step:.2f} mm apart; "
                "send the complete series", code="missing_slices")
        raise InconsistentSeriesError(
            f"{series.label} has unevenly spaced slices (steps from {steps.min():.2f} to {steps.max():.2f} mm, "
            f"median {step:.2f} mm); brainscan reconstructs evenly spaced series only", code="uneven_spacing")
    # Positions must lie on one line along the normal (no shear, no in-plane jumps between slices).
    expected = positions[0] + np.outer(distance - distance[0], normal)
    off_line = float(np.abs(positions - expected).max())
    if off_line > max(tolerance, 0.01 * float(np.min(spacings[0]))):
        raise InconsistentSeriesError(
            f"{series.label} has slices shifted within their planes by up to {off_line:.2f} mm (sheared or "
            "tilted stack); brainscan reconstructs slices stacked along their normal only", code="misaligned_slices")
    row_spacing, column_spacing = spacings[0]
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing
    affine[:3, 1] = column_cosine * row_spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[0]
    return headers, affine


def _pixels(dataset: Dataset, series: DicomSeries) -> np.ndarray:
    if int(dataset.get("SamplesPerPixel", 1)) != 1 or not str(dataset.get("PhotometricInterpretation", "")).startswith(
            "MONOCHROME"):
        raise UnsupportedFormatError(f"{series.label} is not a greyscale image "
                                     f"({dataset.get('PhotometricInterpretation', '?')})", code="not_greyscale")
    try:
        pixels = dataset.pixel_array.astype(np.float32)
    except Exception as exc:  # decoders raise many types for damaged data
        raise CorruptFileError(f"{series.label} slice {dataset.get('InstanceNumber', '?')} has pixel data that "
                               f"cannot be decoded: {' '.join(str(exc).split())}") from exc
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    if str(dataset.PhotometricInterpretation) == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels * slope + intercept


def series_volume(series: DicomSeries) -> SeriesVolume:
    """Reconstruct a series: check it (see :func:`slice_geometry`), decode its pixels, stack them.

    Returns:
        The :class:`SeriesVolume` (float32 ``(columns, rows, slices)``, RAS affine).

    Raises:
        InconsistentSeriesError: the slices do not make one volume (see :func:`slice_geometry`).
        UnsupportedTransferSyntaxError: compressed pixel data without a decoder here.
        UnsupportedFormatError: colour images. CorruptFileError: pixel data that cannot be decoded.
    """
    for instance in series.instances:
        check_decodable(instance, series)
    headers, lps_affine = slice_geometry(series)
    by_uid = {str(i.header.SOPInstanceUID): i for i in series.instances}
    data = np.stack([_pixels(by_uid[str(h.SOPInstanceUID)].load(), series).T for h in headers], axis=-1)
    volume = SeriesVolume(data=np.ascontiguousarray(data, dtype=np.float32), affine=LPS_TO_RAS @ lps_affine,
                          instances=headers, series=series)
    logger.info("series %s reconstructed: %s voxels of %s mm", series.number, volume.shape,
                tuple(round(s, 3) for s in volume.spacing))
    return volume


__all__ = ["LPS_TO_RAS", "MIN_SLICES", "SeriesVolume", "nifti_volume", "series_volume", "slice_geometry"]
