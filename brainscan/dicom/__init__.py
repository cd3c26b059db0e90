"""DICOM studies in, DICOM SEG out.

- :mod:`~brainscan.dicom.reader`: read a study folder or zip (any structure), group it into series.
- :mod:`~brainscan.dicom.sequences`: which series is t1, t1ce, t2, flair (or an explicit mapping).
- :mod:`~brainscan.dicom.volume`: check a series and rebuild its volume with its geometry (RAS affine).
- :mod:`~brainscan.dicom.registration`: t1, t2, flair registered rigidly and resampled onto t1ce.
- :mod:`~brainscan.dicom.skullstrip`: is the study skull-stripped; if not, its brain (MNI152 template).
- :mod:`~brainscan.dicom.case`: all of that as a case for ``segment_case``, and the outputs.
- :mod:`~brainscan.dicom.seg`: the label map as a DICOM Segmentation referencing the t1ce series.

pydicom, highdicom and SimpleITK are imported by these modules only, never by ``import brainscan``.
"""

from brainscan.dicom.case import DicomCase, check_study, is_dicom_input, load_dicom_case, save_dicom_results
from brainscan.dicom.reader import DicomSeries, DicomStudy, StudyLimits, read_study
from brainscan.dicom.seg import algorithm_identification, read_dicom_seg, write_dicom_seg
from brainscan.dicom.sequences import guess_modality, identify_series
from brainscan.dicom.skullstrip import extract_brain
from brainscan.dicom.volume import SeriesVolume, series_volume

__all__ = [
    "DicomCase", "DicomSeries", "DicomStudy", "SeriesVolume", "StudyLimits", "algorithm_identification", "check_study",
    "extract_brain", "guess_modality", "identify_series", "is_dicom_input", "load_dicom_case", "read_dicom_seg",
    "read_study", "save_dicom_results", "series_volume", "write_dicom_seg",
]
