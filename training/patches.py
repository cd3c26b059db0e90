"""Random 3D training patches from BraTS cases: foreground oversampling, augmentation (:mod:`training.augment`).

Cases go through the serving path first (:func:`~brainscan.preprocess.volume3d.preprocess_case`
for the four modalities, :func:`~brainscan.preprocess.volume3d.crop_like` for the label map), so
the network trains on exactly the grid and intensities it will be served. The preprocessed arrays
can be cached as ``.npy`` files and memory-mapped, so a 369-case BraTS 2020 training set (about
20 GB as float32) is read patch by patch instead of held in RAM.

Patch ``i`` of a stream is a pure function of ``(seed, i)``: its own ``numpy`` generator picks the
case, the centre and the augmentation. The tf.data pipeline can therefore sample in parallel and
still be reproducible, and ``--resume`` continues the stream at the patch where it stopped
(``start``) instead of replaying the first epochs. A fraction ``foreground_fraction`` of the
patches (spread evenly through the stream, as Bresenham spreads pixels along a line) is centred
on a tumour voxel of a randomly chosen tumour class, so that the rare classes (NCR, ET: often
under 1 % of the voxels) are seen in every batch; the others are placed uniformly.

Example:
    >>> cases = prepare_cases(find_cases(root), VolumePreprocessConfig(divisor=8), cache_dir=work / "cache")
    >>> sampler = PatchSampler(cases, patch_size=128, foreground_fraction=1 / 3, seed=0)
    >>> dataset = sampler.dataset(batch_size=2)      # ((2, 128, 128, 128, 4), (2, 128, 128, 128, 4))
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.data.brats import BratsCase, load_case
from brainscan.errors import DatasetLayoutError
from brainscan.labels import BRATS_LABELS, brats_to_index
from brainscan.preprocess.volume3d import CropInfo, VolumePreprocessConfig, crop_like, preprocess_case
from training.augment import AugmentConfig, augment_patch, spatial_transform, transform_patch
from training.runtime import without_autotune

log = logging.getLogger(__name__)

NUM_CLASSES = len(BRATS_LABELS)
_CACHE_VERSION = 2  # 2: the voxel spacing and affine are passed to preprocessing (resampling, orientation)
TARGETS = ("classes", "regions")


@dataclass
class PreparedCase:
    """One case on the network grid.

    Attributes:
        case_id: e.g. ``"BraTS20_Training_001"``.
        image: float32 ``(X', Y', Z', 4)`` (may be a read-only memory map).
        labels: uint8 ``(X', Y', Z')`` class indices 0..3 (``brats_to_index`` of the label map).
        info: the :class:`CropInfo` of preprocessing.
        foreground: tumour class index -> flat indices (int32) of its voxels in ``labels``.
        soft: float32 ``(X', Y', Z', 3)`` soft region targets (:func:`soft_region_targets`), or ``None``.
    """

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    info: CropInfo
    foreground: dict[int, np.ndarray] = field(default_factory=dict)
    soft: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]


@dataclass
class PackedCase:
    """A labelled case read from a pack (:mod:`training.pack`): preprocessed already, no NIfTI needed.

    Attributes:
        case_id: as in the source folder.
        prepared: the case on the network grid, made by :func:`prepare_case` when the pack was written.
        preprocessing: the :class:`VolumePreprocessConfig` dict it was made with.
        spacing: the voxel size (mm) of the source grid, on which ``truth`` lies.
        label_convention: the labels of the source files (masks for the case use it).
        fingerprint: the case's lines of :func:`dataset_fingerprint` (file names and sizes), so that a
            run on the pack has the data fingerprint of a run on the folder it came from.
        truth: returns the source label map ``(X, Y, Z)`` uint8 in labels {0, 1, 2, 4}, read on demand.
    """

    case_id: str
    prepared: PreparedCase
    preprocessing: dict[str, Any]
    spacing: tuple[float, float, float]
    label_convention: str
    fingerprint: list[str]
    truth: Any


def _foreground_index(labels: np.ndarray) -> dict[int, np.ndarray]:
    flat = labels.ravel()
    return {k: np.flatnonzero(flat == k).astype(np.int32) for k in range(1, NUM_CLASSES) if (flat == k).any()}


def prepare_arrays(case_id: str, channels: np.ndarray, seg: np.ndarray,
                   config: VolumePreprocessConfig, spacing: Sequence[float] | None = None,
                   affine: np.ndarray | None = None) -> PreparedCase:
    """Preprocess in-memory arrays: ``channels (4, X, Y, Z)`` and BraTS ``seg (X, Y, Z)``.

    ``spacing`` (mm; ``None``: 1 mm, or from ``affine``) and ``affine`` (orientation) are passed to
    :func:`preprocess_case` exactly as serving passes them.

    Raises:
        InvalidLabelsError: ``seg`` holds values outside {0, 1, 2, 4}.
        And the errors of :func:`preprocess_case` / :func:`crop_like`.
    """
    image, info = preprocess_case(channels, config, spacing=spacing, affine=affine)
    labels = brats_to_index(crop_like(seg, info)).astype(np.uint8)
    return PreparedCase(case_id, image, labels, info, _foreground_index(labels))


def soft_region_targets(truth: np.ndarray, info: CropInfo) -> np.ndarray:
    """Each network voxel's fraction of whole tumour, tumour core and enhancing tumour: ``(X', Y', Z', 3)`` float32.

    The region masks of the label map on its own grid (``truth``, labels {0, 1, 2, 4}) go through the
    preprocessing's crop and a trilinear resampling (at 1 mm to 2 mm, the mean of each 2x2x2 block),
    where the class targets take the nearest label. ``bench/resolution_ceiling.py`` measured what
    that costs on the 19 cases here: a network reproducing the nearest-label targets exactly would
    score enhancing tumour 0.862 at 1 mm, one reproducing these fractions 0.917.
    """
    from brainscan.labels import brats_to_regions

    return crop_like(brats_to_regions(truth).astype(np.float32), info, order=1)


def attach_soft_targets(cases: Sequence[BratsCase | PackedCase], prepared: Sequence[PreparedCase]) -> None:
    """Give each prepared case its :func:`soft_region_targets`, from its label file (or a pack's stored copy)."""
    for case, ready in zip(cases, prepared, strict=True):
        if ready.soft is None:
            truth, _ = read_truth(case)
            ready.soft = soft_region_targets(truth, ready.info)


def _source_signature(case: BratsCase, config: VolumePreprocessConfig) -> dict[str, Any]:
    files = [*case.modalities.values(), case.seg]
    return {
        "cache_version": _CACHE_VERSION,
        "preprocessing": config.to_dict(),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files if p is not None],
    }


def prepare_case(case: BratsCase | PackedCase, config: VolumePreprocessConfig,
                 cache_dir: Path | None = None) -> PreparedCase:
    """Load, validate and preprocess a labelled case, through an on-disk cache if given.

    Args:
        case: from :func:`~brainscan.data.brats.find_cases` (must have a segmentation), or a
            :class:`PackedCase` (returned as packed, once its preprocessing is checked against ``config``).
        config: the preprocessing the bundle will record.
        cache_dir: folder for ``<case_id>/{image,labels}.npy``; reused while the source files
            (names, sizes, mtimes) and ``config`` are unchanged, and memory-mapped when read.

    Raises:
        DatasetLayoutError: the case has no segmentation.
        And the errors of :func:`~brainscan.data.brats.load_case`.
    """
    if isinstance(case, PackedCase):
        if case.preprocessing != config.to_dict():
            raise DatasetLayoutError(f"case {case.case_id} of the pack was preprocessed with {case.preprocessing}, "
                                     f"this run needs {config.to_dict()}: write the pack again with the run's "
                                     "--preset and --target-spacing")
        return case.prepared
    if case.seg is None:
        raise DatasetLayoutError(f"case {case.case_id} has no segmentation; training needs <case>_seg.nii[.gz]")
    folder = Path(cache_dir) / case.case_id if cache_dir is not None else None
    signature = _source_signature(case, config)
    if folder is not None and (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("signature") == signature:
            labels = np.load(folder / "labels.npy")
            return PreparedCase(case.case_id, np.load(folder / "image.npy", mmap_mode="r"), labels,
                                CropInfo.from_dict(meta["info"]), _foreground_index(labels))
    loaded = load_case(case)
    assert loaded.seg is not None
    prepared = prepare_arrays(case.case_id, loaded.channels, loaded.seg, config,
                              spacing=tuple(loaded.reference.spacing[:3]), affine=loaded.reference.affine)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "image.npy", prepared.image)
        np.save(folder / "labels.npy", prepared.labels)
        # meta.json last: a half-written cache entry has none and is rebuilt next time.
        (folder / "meta.json").write_text(json.dumps({"signature": signature, "info": prepared.info.to_dict()}))
        prepared.image = np.load(folder / "image.npy", mmap_mode="r")
    return prepared


def prepare_cases(cases: Sequence[BratsCase | PackedCase], config: VolumePreprocessConfig,
                  cache_dir: Path | None = None) -> list[PreparedCase]:
    """:func:`prepare_case` for each case, with a log line per 25 cases."""
    prepared = []
    for number, case in enumerate(cases, 1):
        prepared.append(prepare_case(case, config, cache_dir))
        if number % 25 == 0 or number == len(cases):
            log.info("preprocessed %d/%d cases", number, len(cases))
    return prepared


def extract_patch(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[start : start + size]`` over the 3 spatial axes, zero-filled where it leaves the array.

    Args:
        array: ``(X, Y, Z[, C])``.
        start: corner per axis; may be negative or run past the end.
        size: patch length per axis.

    Returns:
        a new ``(size..., [C])`` array of ``array``'s dtype.
    """
    out = np.zeros((*size, *array.shape[3:]), dtype=array.dtype)
    source = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, size, array.shape[:3]))
    target = tuple(slice(src.start - s, src.stop - s) for src, s in zip(source, start))
    if all(src.stop > src.start for src in source):
        out[target] = array[source]
    return out


class PatchSampler:
    """A reproducible, indexable stream of augmented training patches.

    Args:
        cases: prepared training cases (at least one).
        patch_size: cube side ``P`` in voxels.
        foreground_fraction: share of patches centred on a tumour voxel, in [0, 1].
        augment: transforms, or ``None`` for raw patches.
        seed: stream seed; patch ``i`` depends on ``(seed, i)`` only.
        targets: ``"classes"`` (one-hot background/NCR/ED/ET) or ``"regions"`` (WT/TC/ET masks)
            in :meth:`dataset`.
        soft: with ``targets="regions"``, the cases' soft region targets (each voxel's fraction of a
            region, :func:`attach_soft_targets`) instead of 0/1 masks from the nearest label.

    Raises:
        ValueError: for no cases, a bad patch size or fraction, soft targets that are missing or
            asked for with class targets.
    """

    def __init__(self, cases: Sequence[PreparedCase], *, patch_size: int, foreground_fraction: float = 1 / 3,
                 augment: AugmentConfig | None = None, seed: int = 0, targets: str = "classes",
                 soft: bool = False) -> None:
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        if soft and (targets != "regions" or any(c.soft is None for c in cases)):
            raise ValueError("soft targets need targets='regions' and every case's soft targets (attach_soft_targets)")
        if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.cases = list(cases)
        self.patch_size = int(patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.augment = augment
        self.seed = int(seed)
        self.targets = targets
        self.soft = bool(soft)

    def is_foreground(self, index: int) -> bool:
        """Whether patch ``index`` is centred on tumour: exactly ``fraction`` of any long run."""
        f = self.foreground_fraction
        return math.floor((index + 1) * f + 1e-9) > math.floor(index * f + 1e-9)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``index`` of the stream.

        Returns:
            ``(image float32 (P, P, P, C), labels uint8 (P, P, P))``, or with ``soft`` the targets
            float32 ``(P, P, P, 3)`` in place of the labels. A foreground patch has a tumour voxel at
            ``(P // 2, P // 2, P // 2)`` before flipping; a case smaller than the patch is zero-padded
            at a random offset.
        """
        rng = np.random.default_rng([self.seed, int(index)])
        case = self.cases[int(rng.integers(len(self.cases)))]
        size = (self.patch_size,) * 3
        if self.is_foreground(int(index)) and case.foreground:
            classes = sorted(case.foreground)
            voxels = case.foreground[classes[int(rng.integers(len(classes)))]]
            centre = np.unravel_index(int(voxels[int(rng.integers(len(voxels)))]), case.shape)
            start = [int(c) - p // 2 for c, p in zip(centre, size)]
        else:
            # Fully inside when the case is larger than the patch; else the case lands anywhere in it.
            start = [int(rng.integers(min(0, n - p), max(0, n - p) + 1)) for n, p in zip(case.shape, size)]
        # Soft targets are cut (and rotated, trilinearly) exactly as the image is.
        target, order = (case.soft, 1) if self.soft else (case.labels, 0)
        matrix = spatial_transform(rng, self.augment) if self.augment is not None else None
        if matrix is not None:
            centre = [s + p // 2 for s, p in zip(start, size)]
            image = transform_patch(case.image, matrix, centre, size, order=1)
            labels = transform_patch(target, matrix, centre, size, order=order)
        else:
            image = extract_patch(case.image, start, size)
            labels = extract_patch(target, start, size)
        if self.augment is not None:
            image, labels = augment_patch(image, labels, rng, self.augment)
        if self.soft:
            return image.astype(np.float32, copy=False), np.clip(labels, 0.0, 1.0).astype(np.float32, copy=False)
        return image.astype(np.float32, copy=False), labels.astype(np.uint8, copy=False)

    def dataset(self, batch_size: int, *, start: int = 0, one_hot: bool = True):
        """An endless ``tf.data.Dataset`` of batches, from patch ``start`` on.

        Args:
            batch_size: patches per batch (global batch under a distribution strategy).
            start: index of the first patch (``epoch * steps_per_epoch * batch_size`` on resume).
            one_hot: labels as float32 targets (one-hot ``(B, P, P, P, 4)``, or the 3 region masks
                when the sampler's ``targets`` is ``"regions"``), else uint8 indices ``(B, P, P, P)``.

        Returns:
            ``tf.data.Dataset`` of ``(images (B, P, P, P, C) float32, labels)``; patches are cut in
            parallel, in a deterministic order.
        """
        import tensorflow as tf

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        p, channels = self.patch_size, self.cases[0].image.shape[-1]

        def cut(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            if self.soft:  # the targets come out of the sampler ready
                image, targets = tf.numpy_function(self.sample, [index], (tf.float32, tf.float32), stateful=False)
                image.set_shape((p, p, p, channels))
                targets.set_shape((p, p, p, 3))
                return image, targets
            image, labels = tf.numpy_function(self.sample, [index], (tf.float32, tf.uint8), stateful=False)
            image.set_shape((p, p, p, channels))
            labels.set_shape((p, p, p))
            if one_hot and self.targets == "regions":
                # class indices 0 bg, 1 NCR, 2 ED, 3 ET -> nested WT, TC, ET masks
                labels = tf.cast(labels, tf.int32)
                labels = tf.cast(tf.stack([labels > 0, (labels == 1) | (labels == 3), labels == 3], axis=-1),
                                 tf.float32)
            elif one_hot:
                labels = tf.one_hot(tf.cast(labels, tf.int32), NUM_CLASSES, dtype=tf.float32)
            return image, labels

        dataset = tf.data.Dataset.counter(start).map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return without_autotune(dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

    def batch(self, batch_size: int, number: int, *, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``number`` of the stream that :meth:`dataset` yields (same patches, same targets)."""
        first = start + number * batch_size
        images, labels = zip(*(self.sample(first + i) for i in range(batch_size)))
        if self.soft:
            return np.stack(images), np.stack(labels)
        index = np.stack(labels)
        if self.targets == "regions":
            index = index.astype(np.int32)
            target = np.stack([index > 0, (index == 1) | (index == 3), index == 3], axis=-1)
        else:
            target = np.eye(NUM_CLASSES, dtype=bool)[index]
        return np.stack(images), target.astype(np.float32)

    def batches(self, batch_size: int, steps: int, *, start: int = 0, workers: int = 1,
                processes: bool = True) -> Any:
        """``steps`` batches as a ``keras.utils.PyDataset``: the same stream as :meth:`dataset`, for
        Keras backends without tf.data (JAX on a GPU machine that has no TensorFlow).

        Args:
            batch_size: patches per batch.
            steps: batches in all (the rest of the run: ``(epochs - done) * steps_per_epoch``).
            start: index of the first patch.
            workers: processes cutting patches in parallel (1: in the training thread).
            processes: ``False`` for threads instead of forked processes (a GPU process may not fork
                safely once its CUDA runtime and XLA threads are up; NumPy releases the GIL for most
                of a patch's work).
        """
        import keras

        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be at least 1, got {batch_size}, {steps}")
        sampler = self

        class PatchBatches(keras.utils.PyDataset):
            def __init__(self) -> None:
                super().__init__(workers=workers, use_multiprocessing=processes and workers > 1,
                                 max_queue_size=4 * workers)

            def __len__(self) -> int:
                return steps

            def __getitem__(self, number: int) -> tuple[np.ndarray, np.ndarray]:
                return sampler.batch(batch_size, int(number), start=start)

        return PatchBatches()


def read_truth(case: BratsCase | PackedCase) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A labelled case's label map on its own grid, in labels {0, 1, 2, 4}, and that grid's voxel size (mm).

    Reads only the segmentation file (a pack: its stored copy), whatever the case's label convention.
    """
    from brainscan.io.nifti import load_nifti
    from brainscan.labels import from_convention

    if isinstance(case, PackedCase):
        return case.truth(), case.spacing
    if case.seg is None:
        raise DatasetLayoutError(f"case {case.case_id} has no segmentation")
    truth = load_nifti(case.seg)
    labels = from_convention(truth.data.reshape(truth.data.shape[:3]).astype(np.uint8), case.label_convention)
    return labels, tuple(float(s) for s in truth.spacing[:3])


def fingerprint_lines(case: BratsCase | PackedCase) -> list[str]:
    """A case's share of :func:`dataset_fingerprint`: its id with each file's name and size."""
    if isinstance(case, PackedCase):
        return list(case.fingerprint)
    return [f"{case.case_id}\t{path.name}\t{path.stat().st_size}"
            for path in [*case.modalities.values(), case.seg] if path is not None]


def dataset_fingerprint(cases: Sequence[BratsCase | PackedCase]) -> str:
    """sha256 of every case id with its files' names and sizes (order-independent; a pack's cases
    give the fingerprint of the folder they were packed from)."""
    lines = [line for case in cases for line in fingerprint_lines(case)]
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


__all__ = [
    "PackedCase", "PatchSampler", "PreparedCase", "attach_soft_targets", "dataset_fingerprint", "extract_patch",
    "fingerprint_lines", "prepare_arrays", "prepare_case", "prepare_cases", "read_truth", "soft_region_targets",
]
