"""Build honest DICOM MR studies for the tests, from real (or phantom) BraTS volumes.

No brain MR DICOM study ships in any wheel, so the tests make their own: each series is an
acquisition with its own clinical-like geometry (0.9 mm pixels, 3-5 mm slices; axial, sagittal or
oblique planes; its own matrix and field of view), sampled from a co-registered BraTS case by
trilinear interpolation, averaged across the slice thickness (partial volume, as a thick slice
integrates), and written as one MR Image Storage instance per slice with pydicom. Nothing is
committed: studies are generated into pytest's tmp_path.

Because the BraTS modalities are co-registered, the true alignment of the series in patient
coordinates is the identity, unless an acquisition adds ``motion`` (a known rigid movement of
the patient between series, which registration should undo).

Patient attributes are synthetic (``SYNTHETIC^BRAINSCAN``), and a test checks they never reach a log.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from brainscan.labels import MODALITIES

PATIENT_NAME = "SYNTHETIC^BRAINSCAN"
PATIENT_ID = "BRAINSCAN-TEST-0006"
PATIENT_BIRTH_DATE = "19700101"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PLANES = {  # row cosine, column cosine (LPS), as scanners write them
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class Acquisition:
    """How one series is acquired.

    Attributes:
        modality: the BraTS volume it images (t1, t1ce, t2, flair).
        description: SeriesDescription (also the ProtocolName).
        plane: ``"axial"``, ``"sagittal"`` or ``"coronal"``; ``tilt_deg`` makes it oblique
            (rotation about the patient's left-right axis).
        pixel_mm, slice_mm: in-plane pixel size and slice spacing (= thickness, no gap).
        matrix: ``(rows, columns)``.
        slices: number of slices.
        offset_mm: field-of-view centre relative to the brain's centre (LPS).
        motion: ``(rotation about superior axis in degrees, translation in mm (LPS))``: the patient
            moved by this between this series and the others.
        sequence: DICOM MR attributes (RepetitionTime, EchoTime, ScanningSequence...).
        rescale_slope: stored pixels are value / slope (some vendors scale).
    """

    modality: str
    description: str
    plane: str = "axial"
    tilt_deg: float = 0.0
    pixel_mm: float = 0.9
    slice_mm: float = 3.0
    matrix: tuple[int, int] = (256, 256)
    slices: int = 52
    offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    motion: tuple[float, tuple[float, float, float]] | None = None
    sequence: dict = field(default_factory=dict)
    rescale_slope: float = 1.0


_T1 = {"ScanningSequence": ["SE"], "SequenceVariant": ["SP"], "RepetitionTime": 550.0, "EchoTime": 12.0}
_T2 = {"ScanningSequence": ["SE"], "SequenceVariant": ["SK", "SP"], "RepetitionTime": 4500.0, "EchoTime": 100.0}
_FLAIR = {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "RepetitionTime": 9000.0,
          "EchoTime": 85.0, "InversionTime": 2500.0}

#: A clinical brain-tumour protocol: t1ce axial 3 mm (the reference grid), t1 sagittal 4 mm, t2
#: axial 5 mm with its own matrix, a shifted field of view and a patient who turned 4 degrees and
#: moved about 4 mm before it, flair oblique (tilted 12 degrees) 4 mm.
CLINICAL_PROTOCOL: tuple[Acquisition, ...] = (
    Acquisition("t1ce", "AX T1 SE POST GD", "axial", slice_mm=3.0, slices=52,
                sequence={**_T1, "ContrastBolusAgent": "Gadobutrol 7.5 ml"}),
    Acquisition("t1", "SAG T1 SE", "sagittal", slice_mm=4.0, slices=40, matrix=(256, 240)),
    Acquisition("t2", "AX T2 TSE", "axial", slice_mm=5.0, slices=32, matrix=(240, 256), offset_mm=(6.0, -9.0, 7.0),
                motion=(4.0, (3.0, -2.0, 2.5)), sequence=_T2, rescale_slope=2.0),
    Acquisition("flair", "t2_tirm_tra_dark-fluid", "axial", tilt_deg=12.0, slice_mm=4.0, slices=46,
                offset_mm=(0.0, 4.0, -5.0), sequence=_FLAIR),
)


def small_protocol(pixel_mm: float = 3.6, slice_mm: float = 5.0) -> tuple[Acquisition, ...]:
    """The clinical protocol's planes and descriptions on a coarse grid (fast tests of structure)."""
    scale = pixel_mm / 0.9
    return tuple(replace(a, pixel_mm=pixel_mm, slice_mm=slice_mm, matrix=tuple(int(m / scale) for m in a.matrix),
                         slices=int(np.ceil(a.slices * a.slice_mm / slice_mm)) + 2)
                 for a in CLINICAL_PROTOCOL)


@dataclass
class SourceCase:
    """Co-registered volumes to acquire from: ``volumes[modality]`` float32 ``(X, Y, Z)``, one RAS affine."""

    name: str
    volumes: dict[str, np.ndarray]
    affine: np.ndarray
    seg: np.ndarray | None = None

    def brain_centre_lps(self) -> np.ndarray:
        nonzero = np.argwhere(np.any([v != 0 for v in self.volumes.values()], axis=0))
        centre = (nonzero.min(axis=0) + nonzero.max(axis=0)) / 2.0
        return (_LPS_TO_RAS @ self.affine @ np.append(centre, 1.0))[:3]


def brats_source(case_dir: Path) -> SourceCase:
    """A real BraTS case folder as a source."""
    from brainscan.data.brats import find_case, load_case

    loaded = load_case(find_case(case_dir), with_seg=True)
    return SourceCase(loaded.case_id, {m: loaded.channels[i] for i, m in enumerate(MODALITIES)},
                      loaded.reference.affine, loaded.seg)


def phantom_source(shape: Sequence[int] = (48, 48, 32), seed: int = 3) -> SourceCase:
    """A synthetic BraTS phantom (MNI template anatomy) as a source: for tests of structure only."""
    from brainscan.data.phantoms import make_brats_phantom

    phantom = make_brats_phantom(seed, shape)
    return SourceCase(f"phantom-{seed}", {m: phantom.channels[i].astype(np.float32) for i, m in enumerate(MODALITIES)},
                      phantom.affine, phantom.seg)


def _rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def motion_matrix(motion: tuple[float, Sequence[float]] | None, centre_lps: np.ndarray) -> np.ndarray:
    """4x4 LPS map of a patient movement: where the anatomy seen at a point was before it moved."""
    matrix = np.eye(4)
    if motion is None:
        return matrix
    degrees, shift = motion
    rotation = _rotation((0.0, 0.0, 1.0), degrees)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre_lps - rotation @ centre_lps + np.asarray(shift, dtype=np.float64)
    return matrix


def acquisition_grid(acquisition: Acquisition, centre_lps: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine and ``(columns, rows, slices)`` shape of an acquisition centred near ``centre_lps``."""
    row, column = (np.asarray(v) for v in _PLANES[acquisition.plane])
    if acquisition.tilt_deg:
        tilt = _rotation((1.0, 0.0, 0.0), acquisition.tilt_deg)
        row, column = tilt @ row, tilt @ column
    normal = np.cross(row, column)
    rows, columns = acquisition.matrix
    shape = (columns, rows, acquisition.slices)
    lps = np.eye(4)
    lps[:3, 0] = row * acquisition.pixel_mm
    lps[:3, 1] = column * acquisition.pixel_mm
    lps[:3, 2] = normal * acquisition.slice_mm
    centre = centre_lps + np.asarray(acquisition.offset_mm)
    lps[:3, 3] = centre - lps[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return _LPS_TO_RAS @ lps, shape


def acquire(source: SourceCase, acquisition: Acquisition, *,
            thickness_samples: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``source`` on the acquisition's grid; returns ``(data (X, Y, Z) float32, RAS affine)``."""
    centre = source.brain_centre_lps()
    affine, shape = acquisition_grid(acquisition, centre)
    moved = _LPS_TO_RAS @ motion_matrix(acquisition.motion, centre) @ _LPS_TO_RAS
    to_source = np.linalg.inv(source.affine) @ moved @ affine
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
    volume = source.volumes[acquisition.modality]
    out = np.zeros(shape, dtype=np.float32)
    offsets = (np.arange(thickness_samples) + 0.5) / thickness_samples - 0.5 if thickness_samples > 1 else [0.0]
    for offset in offsets:
        points = grid + np.array([0.0, 0.0, offset], dtype=np.float32)
        coords = points @ to_source[:3, :3].T.astype(np.float32) + to_source[:3, 3].astype(np.float32)
        out += ndi.map_coordinates(volume, np.moveaxis(coords, -1, 0), order=1, mode="constant", cval=0.0)
    return out / len(offsets), affine


@dataclass
class StudyInfo:
    """Attributes shared by the series of one study (synthetic patient)."""

    study_uid: str
    frame_uid: str
    description: str = "MR BRAIN TUMOUR"
    study_id: str = "1"
    accession: str = "SYN0006"


def uid(*parts: object) -> str:
    """A deterministic UID (pydicom's root) from ``parts``."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def new_study(name: str) -> StudyInfo:
    return StudyInfo(study_uid=uid(name, "study"), frame_uid=uid(name, "frame"))


def mr_instance(pixels: np.ndarray, *, study: StudyInfo, series_uid: str, series_number: int, instance_number: int,
                position_lps: Sequence[float], row_cosine: Sequence[float], column_cosine: Sequence[float],
                pixel_spacing: tuple[float, float], slice_mm: float, description: str,
                sequence: dict | None = None, rescale_slope: float = 1.0) -> object:
    """One MR Image Storage instance (pydicom Dataset) of a slice ``pixels`` ``(rows, columns)``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    sop_uid = uid(series_uid, instance_number)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20261201"
    ds.StudyTime, ds.SeriesTime = "090000", f"09{series_number:02d}00"
    ds.AcquisitionTime = ds.ContentTime = ds.SeriesTime
    ds.AccessionNumber = study.accession
    ds.Modality = "MR"
    ds.Manufacturer = "brainscan test studies"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.description
    ds.SeriesDescription = ds.ProtocolName = description
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = PATIENT_BIRTH_DATE, "O", "056Y"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = ds.SpacingBetweenSlices = f"{slice_mm:g}"
    ds.MagneticFieldStrength = 3
    ds.EchoTrainLength = 1
    ds.ScanOptions = ""
    for keyword, value in (sequence or {"ScanningSequence": ["SE"], "SequenceVariant": ["NONE"]}).items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_uid, series_uid
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = study.study_id, series_number, instance_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study.frame_uid, ""
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position_lps]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cosine, *column_cosine)]
    ds.SliceLocation = f"{float(np.dot(position_lps, np.cross(row_cosine, column_cosine))):.6f}"
    ds.PixelSpacing = [f"{pixel_spacing[0]:.6f}", f"{pixel_spacing[1]:.6f}"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    stored = np.clip(np.rint(pixels / rescale_slope), 0, 65535).astype(np.uint16)
    if rescale_slope != 1.0:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{rescale_slope:g}", "0", "US"
    ds.PixelData = stored.tobytes()
    return ds


def volume_instances(data: np.ndarray, affine_ras: np.ndarray, *, study: StudyInfo, series_uid: str,
                     series_number: int, description: str, sequence: dict | None = None,
                     rescale_slope: float = 1.0) -> list:
    """The instances of a series holding ``data`` ``(columns, rows, slices)`` on the grid ``affine_ras``."""
    lps = _LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row, column = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    return [mr_instance(data[:, :, k].T, study=study, series_uid=series_uid, series_number=series_number,
                        instance_number=k + 1, position_lps=lps[:3, :3] @ [0, 0, k] + lps[:3, 3], row_cosine=row,
                        column_cosine=column, pixel_spacing=(spacing[1], spacing[0]), slice_mm=float(spacing[2]),
                        description=description, sequence=sequence, rescale_slope=rescale_slope)
            for k in range(data.shape[2])]


def write_instances(instances: Iterable, folder: Path) -> list[Path]:
    """Save instances under ``folder`` with names that do not follow slice order (as PACS exports do)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in instances:
        name = hashlib.sha1(str(ds.SOPInstanceUID).encode()).hexdigest()[:10].upper()
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass
class StudyFiles:
    """A written study: its folder, and per modality the SeriesInstanceUID and the files."""

    folder: Path
    study: StudyInfo
    series_uids: dict[str, str]
    files: dict[str, list[Path]]
    grids: dict[str, np.ndarray]


def write_study(folder: Path, source: SourceCase, protocol: Sequence[Acquisition] = CLINICAL_PROTOCOL, *,
                thickness_samples: int = 5) -> StudyFiles:
    """Acquire every series of ``protocol`` from ``source`` and write the study under ``folder``.

    Layout: ``folder/PATIENT/STUDY/SE<n>/<hashed names>`` plus a ``README.txt`` that is not DICOM.
    Series numbers follow the protocol order (from 2; series 1 would be the localizer).
    """
    study = new_study(f"{source.name}-{folder.name}")
    root = folder / "PATIENT" / "STUDY"
    series_uids, files, grids = {}, {}, {}
    for number, acquisition in enumerate(protocol, start=2):
        data, affine = acquire(source, acquisition, thickness_samples=thickness_samples)
        series_uid = uid(study.study_uid, acquisition.modality, acquisition.description, number)
        instances = volume_instances(data, affine, study=study, series_uid=series_uid, series_number=number,
                                     description=acquisition.description, sequence=acquisition.sequence,
                                     rescale_slope=acquisition.rescale_slope)
        series_uids[acquisition.modality] = series_uid
        files[acquisition.modality] = write_instances(instances, root / f"SE{number}")
        grids[acquisition.modality] = affine
    (folder / "README.txt").write_text("synthetic study built from a BraTS case for brainscan's tests\n")
    return StudyFiles(folder=folder, study=study, series_uids=series_uids, files=files, grids=grids)


def zip_folder(folder: Path, zip_path: Path) -> Path:
    """Zip ``folder``'s files (relative names) into ``zip_path``."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return zip_path


def edit_instances(paths: Iterable[Path], **attributes: object) -> None:
    """Set DICOM attributes (by keyword) in each file of ``paths``, in place."""
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def copy_study(study: StudyFiles, folder: Path) -> StudyFiles:
    """A copy of ``study`` under ``folder``, for tests that damage it."""
    import shutil

    shutil.copytree(study.folder, folder)
    return StudyFiles(folder=folder, study=study.study, series_uids=dict(study.series_uids),
                      files={m: [folder / p.relative_to(study.folder) for p in paths] for m, paths in study.files.items()},
                      grids=dict(study.grids))
