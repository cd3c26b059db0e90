"""Find, load and validate BraTS cases (2018-2024 naming, 4 modalities + segmentation).

Reports for ``brainscan data inspect`` live in :mod:`brainscan.data.brats_inspect`.

A BraTS case is one folder holding ``<case>_{t1,t1ce,t2,flair}.nii[.gz]`` and, for training data,
``<case>_seg.nii[.gz]``. The case id is the common prefix, whatever the year:

- BraTS 2018: ``Brats18_2013_2_1_flair.nii.gz``, ``Brats18_CBICA_AAB_1_t1ce.nii.gz``
- BraTS 2020: ``BraTS20_Training_001_t1.nii``, ``BraTS20_Validation_001_t2.nii``
- BraTS 2021: ``BraTS2021_00006_flair.nii.gz``

BraTS 2023-2024 cases name the files ``<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``
(``BraTS-GLI-00000-000-t1n.nii.gz``; t1n is t1, t1c t1ce, t2w t2, t2f flair) and number enhancing
tumour 3 instead of 4. A case records the convention its files follow
(:attr:`BratsCase.label_convention`); :func:`load_case` returns its segmentation in brainscan's
labels {0, 1, 2, 4}, and code that writes a mask for the case converts it back with
:func:`brainscan.labels.to_convention`. One case folder holds files of one layout only.

Known quirk: in the widely shared BraTS 2020 copy, case 355's segmentation is named
``W39_1998.09.19_Segm.nii``; a single ``*Segm.nii[.gz]`` file is accepted as the segmentation when
no ``<case>_seg`` file exists.

Example:
    >>> case = find_case(Path("BraTS2021_00006"))
    >>> loaded = load_case(case)
    >>> loaded.channels.shape, loaded.seg.dtype
    ((4, 240, 240, 155), dtype('uint8'))
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainscan.errors import (
    BadDimensionsError,
    BrainscanError,
    DatasetLayoutError,
    InvalidLabelsError,
    MissingModalityError,
    NonFiniteError,
    VolumeMismatchError,
)
from brainscan.io.nifti import Volume, load_nifti
from brainscan.io.parallel import in_threads
from brainscan.labels import (
    BRATS2021,
    BRATS2023,
    BRATS2023_MODALITIES,
    CONVENTION_FILE_NAMES,
    CONVENTION_NAMES,
    MODALITIES,
    from_convention,
)

logger = logging.getLogger(__name__)

#: Largest disagreement between two affines (in mm) that still counts as the same grid.
AFFINE_ATOL_MM = 1e-3

# Anchored at the end, so "_t1" never matches "_t1ce" and vice versa; tried in this order.
_KIND_RES: dict[str, re.Pattern[str]] = {
    BRATS2021: re.compile(r"^(?P<case>.+)_(?P<kind>flair|t1ce|t1|t2|seg)$", re.IGNORECASE),
    BRATS2023: re.compile(r"^(?P<case>.+)-(?P<kind>t1n|t1c|t2w|t2f|seg)$", re.IGNORECASE),
}
#: MODALITIES name -> its BraTS 2023-2024 name, for messages about 2023-layout folders.
_BRATS2023_NAMES = {modality: name for name, modality in BRATS2023_MODALITIES.items()}
_SEGM_RE = re.compile(r"segm$", re.IGNORECASE)
# Hidden files include macOS "._name" resource forks, which would otherwise look like duplicates.
_SKIP_DIRS = {"__MACOSX"}


@dataclass
class BratsCase:
    """Where the files of one BraTS case are.

    Attributes:
        case_id: common file prefix, e.g. ``"BraTS20_Training_001"``.
        folder: the case folder.
        modalities: modality name -> file, in :data:`~brainscan.labels.MODALITIES` order (also for
            2023-2024 files: their t1n file is ``modalities["t1"]``).
        seg: the segmentation file, or ``None`` (validation/test data).
        label_convention: the labels of the case's files, :data:`~brainscan.labels.BRATS2021`
            ({0, 1, 2, 4}, ``<case>_t1`` naming) or :data:`~brainscan.labels.BRATS2023` ({0, 1, 2, 3},
            ``<case>-t1n`` naming); masks written for the case use it.
    """

    case_id: str
    folder: Path
    modalities: dict[str, Path]
    seg: Path | None = None
    label_convention: str = BRATS2021


@dataclass
class LoadedCase:
    """A validated case in memory.

    Attributes:
        case_id: as in :class:`BratsCase`.
        channels: float32 ``(4, X, Y, Z)`` in MODALITIES order, in the files' voxel order.
        seg: uint8 ``(X, Y, Z)`` with BraTS labels {0, 1, 2, 4} whatever the files' convention, or ``None``.
        reference: the flair :class:`Volume` (affine, header, spacing for writing masks back).
        label_convention: as in :class:`BratsCase`: write masks for this case with
            ``save_like(to_convention(mask, loaded.label_convention), loaded.reference, path)``.
    """

    case_id: str
    channels: np.ndarray
    seg: np.ndarray | None
    reference: Volume
    label_convention: str = BRATS2021


@dataclass
class CaseProblem:
    """Why one folder of a dataset is not a usable case."""

    folder: Path
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"folder": str(self.folder), "error": self.code, "detail": self.message}


@dataclass(frozen=True)
class CaseFile:
    """What the name of a BraTS file says.

    Attributes:
        case_id: the case prefix, e.g. ``"BraTS2021_00006"`` or ``"BraTS-GLI-00000-000"``.
        kind: a :data:`~brainscan.labels.MODALITIES` name (``"t1n"`` is ``"t1"``...) or ``"seg"``.
        label_convention: :data:`~brainscan.labels.BRATS2021` or :data:`~brainscan.labels.BRATS2023`.
    """

    case_id: str
    kind: str
    label_convention: str


def _nifti_stem(name: str) -> str | None:
    lower = name.lower()
    for ext in (".nii.gz", ".nii"):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return None


def match_case_file(name: str) -> CaseFile | None:
    """Recognise a BraTS file name of either layout (suffixes case-insensitive, ``.nii`` or ``.nii.gz``).

    Example:
        >>> match_case_file("BraTS-GLI-00000-000-t1c.nii.gz")
        CaseFile(case_id='BraTS-GLI-00000-000', kind='t1ce', label_convention='brats2023')
        >>> match_case_file("BraTS2021_00006_t1ce.nii.gz").kind, match_case_file("notes.txt")
        ('t1ce', None)
    """
    stem = _nifti_stem(name)
    if stem is None:
        return None
    for convention, pattern in _KIND_RES.items():
        match = pattern.match(stem)
        if match:
            kind = match["kind"].lower()
            return CaseFile(match["case"], BRATS2023_MODALITIES.get(kind, kind), convention)
    return None


def _kind_name(kind: str, convention: str) -> str:
    """A modality as the files of ``convention`` name it: ``"t1ce"``, or ``"t1c (t1ce)"``."""
    return f"{_BRATS2023_NAMES[kind]} ({kind})" if convention == BRATS2023 and kind in _BRATS2023_NAMES else kind


def _scan_folder(folder: Path) -> tuple[dict[str, list[Path]], list[Path], list[Path], dict[str, list[Path]]]:
    """Sort the NIfTI files of ``folder`` into kinds (modalities and "seg"), Segm files, others, and
    the recognised files by label convention."""
    by_kind: dict[str, list[Path]] = {}
    segm: list[Path] = []
    unrecognised: list[Path] = []
    conventions: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stem = _nifti_stem(path.name)
        if stem is None:
            continue
        case_file = match_case_file(path.name)
        if case_file is not None:
            by_kind.setdefault(case_file.kind, []).append(path)
            conventions.setdefault(case_file.label_convention, []).append(path)
        elif _SEGM_RE.search(stem):
            segm.append(path)
        else:
            unrecognised.append(path)
    return by_kind, segm, unrecognised, conventions


def _case_prefix(path: Path) -> str:
    case_file = match_case_file(path.name)
    assert case_file is not None
    return case_file.case_id


def find_case(folder: str | Path) -> BratsCase:
    """Recognise the files of one BraTS case folder (BraTS 2018-2021 or 2023-2024 naming).

    Args:
        folder: the case folder; files other than NIfTI, and hidden files, are ignored.

    Returns:
        The :class:`BratsCase`; ``seg`` is ``None`` when the folder has no segmentation, and
        ``label_convention`` says which naming (and so which labels) its files follow.

    Raises:
        DatasetLayoutError: ``folder`` is not a folder, its files belong to different cases or mix
            the 2018-2021 and 2023-2024 naming, or the segmentation is ambiguous.
        MissingModalityError: a modality is missing, or present twice (e.g. ``.nii`` and ``.nii.gz``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder} is not a folder; a BraTS case is a folder of NIfTI files")
    by_kind, segm, unrecognised, conventions = _scan_folder(folder)

    if len(conventions) > 1:
        listed = "; ".join(f"{CONVENTION_NAMES[c]} names {[p.name for p in paths][:5]}"
                           for c, paths in conventions.items())
        raise DatasetLayoutError(
            f"case folder {folder.name} mixes file naming of two BraTS layouts ({listed}); name every file "
            f"{CONVENTION_FILE_NAMES[BRATS2021]} or every file {CONVENTION_FILE_NAMES[BRATS2023]}"
        )
    convention = next(iter(conventions), BRATS2021)
    missing = [m for m in MODALITIES if m not in by_kind]
    if missing:
        found = sorted(p.name for paths in by_kind.values() for p in paths) + [p.name for p in unrecognised]
        expected = (CONVENTION_FILE_NAMES[convention] if conventions else
                    f"{CONVENTION_FILE_NAMES[BRATS2021]} or {CONVENTION_FILE_NAMES[BRATS2023]}")
        raise MissingModalityError(
            f"case folder {folder.name} lacks {', '.join(_kind_name(m, convention) for m in missing)} "
            f"(expected files named {expected}, seg optional); found: {found or 'no NIfTI files'}"
        )
    for kind in (*MODALITIES, "seg"):
        paths = by_kind.get(kind, [])
        if len(paths) > 1:
            error = MissingModalityError if kind != "seg" else DatasetLayoutError
            raise error(
                f"case folder {folder.name} holds {len(paths)} files for {_kind_name(kind, convention)}: "
                f"{[p.name for p in paths]}; keep exactly one"
            )

    modalities = {m: by_kind[m][0] for m in MODALITIES}
    prefixes = {_case_prefix(p) for p in modalities.values()}
    if "seg" in by_kind:
        prefixes.add(_case_prefix(by_kind["seg"][0]))
    if len(prefixes) > 1:
        raise DatasetLayoutError(
            f"case folder {folder.name} mixes files of several cases {sorted(prefixes)}; one case per folder"
        )

    seg: Path | None = by_kind["seg"][0] if "seg" in by_kind else None
    if seg is None and segm:
        if len(segm) > 1:
            raise DatasetLayoutError(
                f"case folder {folder.name} has no <case>_seg file and several *Segm files "
                f"{[p.name for p in segm]}; cannot tell which is the segmentation"
            )
        seg = segm[0]  # BraTS 2020 case 355: "W39_1998.09.19_Segm.nii"
    return BratsCase(case_id=prefixes.pop(), folder=folder, modalities=modalities, seg=seg,
                     label_convention=convention)


def _validate(volumes: dict[str, Volume], seg: Volume | None, case_id: str,
              convention: str = BRATS2021) -> Iterator[BrainscanError]:
    """Yield every problem of a case's volumes (``load_case`` raises the first, inspect lists all);
    the segmentation's labels are checked against ``convention``."""
    shapes = {name: vol.shape for name, vol in volumes.items()}
    for name, shape in shapes.items():
        if len(shape) != 3:
            yield BadDimensionsError(f"{case_id} {name} has shape {shape}; each modality must be a 3D volume")
    images = [v for n, v in volumes.items() if n != "seg"]
    if not images:
        return
    reference = volumes["flair"] if "flair" in volumes else images[0]
    if len({vol.shape for vol in volumes.values()}) > 1:
        yield VolumeMismatchError(f"{case_id} volumes differ in shape: {shapes}")
    for name, vol in volumes.items():
        if vol.affine.shape == reference.affine.shape:
            diff = float(np.max(np.abs(vol.affine - reference.affine)))
            if not diff <= AFFINE_ATOL_MM:
                yield VolumeMismatchError(
                    f"{case_id} {name} is on another grid than flair: affines differ by up to "
                    f"{diff:.4g} mm (tolerance {AFFINE_ATOL_MM} mm); resample it to the flair grid"
                )
    for name, vol in volumes.items():
        if not np.isfinite(vol.data).all():
            yield NonFiniteError(f"{case_id} {name} holds NaN or infinite values")
    if seg is not None and np.isfinite(seg.data).all():
        values = np.unique(seg.data)
        if not np.array_equal(values, np.round(values)):
            yield InvalidLabelsError(f"{case_id} seg holds non-integer values {values[:10].tolist()}")
        else:
            try:
                from_convention(values, convention)
            except InvalidLabelsError as exc:
                yield InvalidLabelsError(f"{case_id} {exc.message}")


def _load_volume(path: Path) -> Volume:
    vol = load_nifti(path)
    # A trailing singleton axis (X, Y, Z, 1) is a 3D volume written by some tools.
    if vol.data.ndim == 4 and vol.data.shape[3] == 1:
        vol.data = vol.data[..., 0]
    return vol


def stack_channels(volumes: Sequence[np.ndarray]) -> np.ndarray:
    """float32 ``(C, X, Y, Z)`` from C same-shape volumes, cast straight into one array whose channels keep
    the files' memory order (NIfTI data is Fortran-ordered): no per-volume float32 copy, no transpose."""
    channels = np.moveaxis(np.empty((*volumes[0].shape, len(volumes)), dtype=np.float32, order="F"), -1, 0)
    for index, volume in enumerate(volumes):
        channels[index] = volume
    return channels


def load_case(case: BratsCase, *, with_seg: bool = True) -> LoadedCase:
    """Read and validate the volumes of a case.

    Args:
        case: from :func:`find_case`.
        with_seg: also read the segmentation (if the case has one).

    Returns:
        :class:`LoadedCase` with float32 channels ``(4, X, Y, Z)`` in MODALITIES order and a uint8
        segmentation ``(X, Y, Z)`` in labels {0, 1, 2, 4} (a 2023-2024 file's 3 becomes 4) or ``None``.

    Raises:
        BadDimensionsError: a volume is not 3D.
        VolumeMismatchError: shapes differ, or affines differ by more than 1e-3 mm.
        NonFiniteError: a volume holds NaN/inf (the message names the modality).
        InvalidLabelsError: the segmentation holds values outside its convention's labels
            ({0, 1, 2, 4} for 2018-2021 files, {0, 1, 2, 3} for 2023-2024 files).
        And the file errors of :func:`~brainscan.io.nifti.load_nifti`.
    """
    volumes = dict(zip(MODALITIES, in_threads(_load_volume, [case.modalities[m] for m in MODALITIES])))
    seg_volume = _load_volume(case.seg) if with_seg and case.seg is not None else None
    if seg_volume is not None:
        volumes["seg"] = seg_volume
    for problem in _validate(volumes, seg_volume, case.case_id, case.label_convention):
        raise problem
    channels = stack_channels([volumes[m].data for m in MODALITIES])
    seg = from_convention(seg_volume.data, case.label_convention) if seg_volume is not None else None
    return LoadedCase(case_id=case.case_id, channels=channels, seg=seg, reference=volumes["flair"],
                      label_convention=case.label_convention)


def scan_dataset(dataset_root: str | Path) -> tuple[list[BratsCase], list[CaseProblem]]:
    """Find every case under a dataset root, collecting the problems of broken case folders.

    Args:
        dataset_root: folder holding one subfolder per case (e.g. ``MICCAI_BraTS2020_TrainingData``);
            a single case folder is accepted too. Loose files (CSV tables) are ignored.

    Returns:
        ``(cases, problems)``: cases sorted by folder name; one :class:`CaseProblem` per subfolder
        that is not a usable case (only file names are checked here, not voxel data).

    Raises:
        DatasetLayoutError: ``dataset_root`` is not a folder.
    """
    root = Path(dataset_root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset root {root} is not a folder")
    if any(_nifti_stem(p.name) for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            return [find_case(root)], []
        except BrainscanError as exc:
            return [], [CaseProblem(root, exc.code, exc.message)]
    cases: list[BratsCase] = []
    problems: list[CaseProblem] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.startswith(".") or folder.name in _SKIP_DIRS:
            continue
        try:
            cases.append(find_case(folder))
        except BrainscanError as exc:
            problems.append(CaseProblem(folder, exc.code, exc.message))
    return cases, problems


def find_cases(dataset_root: str | Path, *, strict: bool = False) -> list[BratsCase]:
    """The usable cases under ``dataset_root`` (see :func:`scan_dataset`), sorted by folder name.

    Args:
        dataset_root: dataset folder holding one subfolder per case.
        strict: raise on the first broken case folder instead of logging and skipping it.

    Raises:
        DatasetLayoutError: not a folder, no case found, or (``strict``) a broken case folder.
    """
    cases, problems = scan_dataset(dataset_root)
    if problems and (strict or not cases):
        detail = "; ".join(f"{p.folder.name}: {p.message}" for p in problems[:5])
        raise DatasetLayoutError(f"{len(problems)} broken case folder(s) under {dataset_root}: {detail}")
    if not cases:
        raise DatasetLayoutError(
            f"no BraTS case folders under {dataset_root}; point at the folder that holds "
            f"e.g. BraTS20_Training_001/ with {CONVENTION_FILE_NAMES[BRATS2021]} (or BraTS-GLI-00000-000/ "
            f"with {CONVENTION_FILE_NAMES[BRATS2023]})"
        )
    for problem in problems:
        logger.warning("skipping %s: %s", problem.folder, problem.message)
    return cases


__all__ = [
    "AFFINE_ATOL_MM", "BratsCase", "CaseFile", "CaseProblem", "LoadedCase", "find_case", "find_cases",
    "load_case", "match_case_file", "scan_dataset",
]
