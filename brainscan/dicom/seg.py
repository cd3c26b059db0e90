"""Write a tumour label map as a DICOM Segmentation (highdicom), and read one back.

The SEG references the t1ce series' instances (one frame per t1ce slice and segment that holds
tumour), copies the patient and study attributes of the source (highdicom does that from the
source images), and describes one segment per BraTS label, each marked AUTOMATIC with brainscan's
algorithm identification (name, brainscan version, model bundle name and version).

Codes (standard, from the DICOM context groups for brain lesion segmentation, PS3.16
CID 7168 "Brain Lesion Segmentation Type With Necrosis" and CID 7169 "... Without Necrosis",
whose category is CID 7150's (SCT 49755003, "Morphologically Abnormal Structure")):

- label 1, NCR: (6574001, SCT, "Necrosis")
- label 2, ED: (79654002, SCT, "Edema")
- label 4, ET: (C113842, NCIt, "Enhancing Lesion"); SNOMED CT has no concept for enhancing
  tumour, which is why CID 7169 takes it from the NCI Thesaurus.

Example:
    >>> write_dicom_seg(mask, t1ce_volume, "seg.dcm", algorithm=algorithm_identification(bundle))
    >>> labels = read_dicom_seg(("seg.dcm"), t1ce_volume)     # the same mask, on the t1ce grid
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.dicom.volume import SeriesVolume
from brainscan.errors import BadDimensionsError, InvalidInputError
from brainscan.labels import BRATS_LABEL_DESCRIPTIONS, BRATS_LABEL_NAMES, check_brats_labels

#: BraTS label -> SEG segment number (1-based, in label order).
SEGMENT_NUMBERS: dict[int, int] = {1: 1, 2: 2, 4: 3}
#: Display colours (CIE L*a*b*), as brainscan's viewer draws them: NCR red, ED green, ET yellow.
_COLOURS = {1: (53.2, 80.1, 67.2), 2: (46.2, -51.7, 49.9), 4: (97.1, -21.6, 94.5)}
SERIES_DESCRIPTION = "brainscan tumour segmentation (research use only)"


def _property_type(label: int) -> Any:
    from pydicom.sr.codedict import codes

    return {1: codes.SCT.Necrosis, 2: codes.SCT.Edema, 4: codes.NCIt.EnhancingLesion}[label]


def algorithm_identification(name: str, version: str, parameters: Mapping[str, Any] | None = None) -> Any:
    """The AlgorithmIdentificationSequence of brainscan with a given model.

    Args:
        name: the model bundle's name, e.g. ``"unet3d-1"``.
        version: the bundle's version.
        parameters: more to record (e.g. inference settings); values are written as text.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from brainscan import __version__

    recorded = {"brainscan_version": __version__, "model": name, "model_version": str(version),
                **{str(k): str(v) for k, v in (parameters or {}).items()}}
    return hd.AlgorithmIdentificationSequence(name="brainscan", family=codes.cid7162.ArtificialIntelligence,
                                              version=f"{__version__} ({name} {version})", source="brainscan",
                                              parameters=recorded)


def bundle_algorithm(bundle: Any, overrides: Mapping[str, Any] | None = None) -> Any:
    """:func:`algorithm_identification` of a loaded segmentation bundle, recording the sliding-window
    settings it runs with (``overrides`` as given to ``segment_case``)."""
    from brainscan.inference.segmenter import inference_settings

    settings = inference_settings(bundle, dict(overrides or {}))
    return algorithm_identification(bundle.name, bundle.version, {k: settings[k] for k in ("patch_size", "overlap")})


def segment_descriptions(algorithm: Any) -> list[Any]:
    """One SegmentDescription per BraTS label (NCR, ED, ET), AUTOMATIC, with ``algorithm``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = []
    for label, number in SEGMENT_NUMBERS.items():
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=BRATS_LABEL_NAMES[label],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_property_type(label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f"brainscan {BRATS_LABEL_NAMES[label]}: {BRATS_LABEL_DESCRIPTIONS[label]}",
            tracking_uid=hd.UID(),
            anatomic_regions=[codes.SCT.Brain],
            display_color=hd.color.CIELabColor(*_COLOURS[label]),
        ))
    return descriptions


def write_dicom_seg(mask: np.ndarray, reference: SeriesVolume, path: str | Path, *, algorithm: Any,
                    series_number: int | None = None) -> Path:
    """Write ``mask`` (BraTS labels on the reference series' grid) as a binary DICOM SEG.

    Args:
        mask: integer ``(columns, rows, slices)`` of the reference volume, labels {0, 1, 2, 4}.
        reference: the t1ce :class:`SeriesVolume` the mask lies on; its instances are the source.
        path: the file to write (e.g. ``seg.dcm``).
        algorithm: from :func:`algorithm_identification`.
        series_number: of the new series (default: the reference's number + 1000).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        BadDimensionsError: ``mask`` is not on the reference grid.
        InvalidLabelsError: values outside {0, 1, 2, 4}.
    """
    import highdicom as hd

    from brainscan import __version__

    mask = np.asarray(mask)
    if mask.shape != reference.shape:
        raise BadDimensionsError(f"mask shape {mask.shape} is not the reference series' grid {reference.shape}")
    check_brats_labels(mask)
    lookup = np.zeros(5, dtype=np.uint8)
    for label, number in SEGMENT_NUMBERS.items():
        lookup[label] = number
    # (columns, rows, slices) -> frames (slices, rows, columns), frame k on source instance k.
    frames = np.ascontiguousarray(lookup[mask.astype(np.intp)].transpose(2, 1, 0))
    number = series_number if series_number is not None else (reference.series.number or 0) + 1000
    seg = hd.seg.Segmentation(
        source_images=reference.instances,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(algorithm),
        series_instance_uid=hd.UID(),
        series_number=number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="brainscan",
        manufacturer_model_name="brainscan",
        software_versions=f"brainscan {__version__}",
        device_serial_number="none",
        series_description=SERIES_DESCRIPTION,
        content_label="TUMOUR",
        content_description="Brain tumour sub-regions NCR, ED, ET; not for clinical use",
        # A mask without tumour still makes a valid SEG: keep its (empty) frames.
        omit_empty_frames=bool(frames.any()),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def read_dicom_seg(path: str | Path, reference: SeriesVolume) -> np.ndarray:
    """Decode a SEG written by :func:`write_dicom_seg` back to BraTS labels on ``reference``'s grid.

    Segments are matched to labels by their property type codes, so a SEG from another tool with
    the same standard codes reads too.

    Returns:
        uint8 ``(columns, rows, slices)`` with labels {0, 1, 2, 4}.

    Raises:
        InvalidInputError: the SEG does not reference the reference series, or holds a segment of
            another kind.
    """
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    by_code = {(_property_type(label).value, _property_type(label).scheme_designator): label
               for label in SEGMENT_NUMBERS}
    labels: dict[int, int] = {}
    for number in seg.segment_numbers:
        code = seg.get_segment_description(number).segmented_property_type
        key = (code.value, code.scheme_designator)
        if key not in by_code:
            raise InvalidInputError(f"{Path(path).name}: segment {number} is {code.meaning}, not a BraTS label")
        labels[number] = by_code[key]
    sop_uids = [str(h.SOPInstanceUID) for h in reference.instances]
    referenced = {str(item.ReferencedSOPInstanceUID) for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    if not referenced <= set(sop_uids):
        raise InvalidInputError(f"{Path(path).name} references images outside the reference series")
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, combine_segments=True,
                                               relabel=False, ignore_spatial_locations=True,
                                               assert_missing_frames_are_empty=True)
    lookup = np.zeros(max(SEGMENT_NUMBERS.values()) + 1, dtype=np.uint8)
    for number, label in labels.items():
        lookup[number] = label
    return np.ascontiguousarray(lookup[np.asarray(pixels, dtype=np.intp)].transpose(2, 1, 0))


__all__ = ["SEGMENT_NUMBERS", "algorithm_identification", "bundle_algorithm", "read_dicom_seg", "segment_descriptions",
           "write_dicom_seg"]
