"""A pack: labelled BraTS cases preprocessed once into one compact file, to train without the NIfTI files.

A GPU machine lent for a few minutes receives at most 64 MiB of working tree: the NIfTI folder of
19 BraTS cases is about 0.5 GB, its preprocessed 2 mm cache about 140 MB as float32 ``.npy``. A
pack holds the same preprocessed cases as float16 in one deflated ``.npz`` (about 2 MB a case at
2 mm), with what whole-volume validation needs (each case's crop record, voxel size and its label
map on the source grid, so validation scores exactly as on the folder). ``brainscan train segmenter
--data PACK.npz`` trains from it as from the folder: same split, same patches, same validation and
the same data fingerprint, and, since nothing in that path needs TensorFlow, under Keras' JAX
backend too (the GPU machine has JAX, not TensorFlow).

Layout of the ``.npz``: ``meta`` (UTF-8 JSON as uint8: pack version, preprocessing, one record per
case), and per case number ``i``: ``i.image`` float16 ``(X', Y', Z', 4)``, ``i.labels`` uint8
``(X', Y', Z')`` class indices, ``i.truth`` uint8 ``(X, Y, Z)`` source labels {0, 1, 2, 4}.

Example:
    brainscan train pack --data BRATS_DIR --preset small --target-spacing 2 --out runs/pack/brats-2mm.npz
    brainscan train segmenter --data runs/pack/brats-2mm.npz --arch unet3d --preset small --target-spacing 2 ...
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.errors import DatasetLayoutError
from brainscan.preprocess.volume3d import CropInfo, VolumePreprocessConfig

log = logging.getLogger(__name__)

PACK_VERSION = 1
PACK_SUFFIX = ".npz"
#: What the GPU machine's working tree may hold in all; a larger pack is written with a warning.
CARRY_LIMIT_BYTES = 64 * 2**20


def is_pack(path: str | Path) -> bool:
    """Whether ``path`` names a pack file (an existing ``.npz`` file) rather than a dataset folder."""
    path = Path(path)
    return path.suffix == PACK_SUFFIX and path.is_file()


def write_pack(cases: Sequence[Any], config: VolumePreprocessConfig, out: str | Path,
               cache_dir: Path | None = None) -> Path:
    """Preprocess labelled cases with the serving function and write them into one pack.

    Args:
        cases: labelled :class:`~brainscan.data.brats.BratsCase` objects.
        config: the preprocessing the training run will record (``SegmenterTrainConfig.preprocess_config``).
        out: the ``.npz`` file; written to a temporary name, then renamed (never half-written).
        cache_dir: the training cache of :func:`~training.patches.prepare_case`, reused if given.

    Raises:
        DatasetLayoutError: no cases, a case without a segmentation, ``out`` not ending in ``.npz``.
        And the data errors of :func:`~brainscan.data.brats.load_case`.
    """
    from training.patches import fingerprint_lines, prepare_case, read_truth

    out = Path(out)
    if out.suffix != PACK_SUFFIX:
        raise DatasetLayoutError(f"a pack is a {PACK_SUFFIX} file, got {out}")
    if not cases:
        raise DatasetLayoutError("no labelled cases to pack")
    arrays: dict[str, np.ndarray] = {}
    records = []
    for number, case in enumerate(cases):
        prepared = prepare_case(case, config, cache_dir)  # validates the case (and its labels) when not cached
        truth, spacing = read_truth(case)  # the label file only: the volumes are not read again
        arrays[f"{number}.image"] = np.asarray(prepared.image, dtype=np.float16)
        arrays[f"{number}.labels"] = np.asarray(prepared.labels, dtype=np.uint8)
        arrays[f"{number}.truth"] = np.asarray(truth, dtype=np.uint8)
        records.append({"case_id": case.case_id, "info": prepared.info.to_dict(), "spacing": list(spacing),
                        "label_convention": case.label_convention, "fingerprint": fingerprint_lines(case)})
        log.info("packed %s (%d/%d)", case.case_id, number + 1, len(cases))
    meta = {"pack_version": PACK_VERSION, "preprocessing": config.to_dict(), "cases": records}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(out)
    size = out.stat().st_size
    log.info("pack written: %s, %d cases, %.1f MiB", out, len(cases), size / 2**20)
    if size > CARRY_LIMIT_BYTES:
        log.warning("%s is %.1f MiB, more than the %d MiB a GPU machine's working tree may carry: pack fewer "
                    "cases (--max-cases) or a coarser --target-spacing", out, size / 2**20, CARRY_LIMIT_BYTES // 2**20)
    return out


def read_pack(path: str | Path) -> list[Any]:
    """The cases of a pack, as :class:`~training.patches.PackedCase` objects sorted by case id.

    Images are read into memory as float32 (as the ``.npy`` cache serves them); each case's source
    label map is read only when validation asks for it.

    Raises:
        DatasetLayoutError: not a readable pack (the message says what is wrong).
    """
    from training.patches import PackedCase, PreparedCase, _foreground_index

    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(archive["meta"]).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"{path} is not a brainscan pack ({exc}); write one with `brainscan train pack`") from exc
    if not isinstance(meta, dict) or meta.get("pack_version") != PACK_VERSION:
        raise DatasetLayoutError(f"{path} is pack version {meta.get('pack_version') if isinstance(meta, dict) else '?'}; "
                                 f"this brainscan reads version {PACK_VERSION}: write the pack again")
    preprocessing = meta["preprocessing"]
    VolumePreprocessConfig.from_dict(preprocessing)  # a damaged record fails here, not mid-training
    cases = []
    for number, record in enumerate(meta["cases"]):
        try:
            image = np.asarray(archive[f"{number}.image"], dtype=np.float32)
            labels = np.asarray(archive[f"{number}.labels"], dtype=np.uint8)
            info = CropInfo.from_dict(record["info"])
        except (KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
            raise DatasetLayoutError(f"{path}: case {number} ({record.get('case_id')}) is damaged: {exc}") from exc
        if image.shape[:3] != labels.shape or image.ndim != 4:
            raise DatasetLayoutError(f"{path}: case {record['case_id']} has image {image.shape} and labels "
                                     f"{labels.shape}; they must share the grid")
        prepared = PreparedCase(record["case_id"], image, labels, info, _foreground_index(labels))
        cases.append(PackedCase(
            case_id=record["case_id"], prepared=prepared, preprocessing=preprocessing,
            spacing=tuple(record["spacing"]), label_convention=record["label_convention"],
            fingerprint=list(record["fingerprint"]),
            truth=lambda key=f"{number}.truth": np.asarray(archive[key], dtype=np.uint8)))
    if not cases:
        raise DatasetLayoutError(f"{path} holds no cases")
    log.info("read %d cases from pack %s", len(cases), path)
    return sorted(cases, key=lambda c: c.case_id)
