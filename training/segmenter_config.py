"""The options of a segmenter training run: :class:`SegmenterTrainConfig`, also ``brainscan train segmenter``'s
command line (:mod:`training.options`), stored in the bundle manifest for reproduction."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainscan.labels import BRATS_LABELS
from training.options import check_choices, option
from training.runtime import MIXED_PRECISION_CHOICES

ARCHITECTURES = ("unet3d", "attention_unet3d")
#: per preset: patch side, steps per epoch, epochs, peak learning rate. The tiny network (4-32
#: filters) needs a 10x larger AdamW step to leave the all-background solution within minutes.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"patch_size": 128, "steps_per_epoch": 250, "epochs": 100, "learning_rate": 1e-3},
    "small": {"patch_size": 48, "steps_per_epoch": 100, "epochs": 15, "learning_rate": 2e-3},
    "tiny": {"patch_size": 32, "steps_per_epoch": 25, "epochs": 8, "learning_rate": 1e-2},
}
_FULL, _TINY = PRESET_DEFAULTS["full"], PRESET_DEFAULTS["tiny"]


@dataclass
class SegmenterTrainConfig:
    """Every knob of a segmenter training run; stored in the bundle manifest for reproduction.

    ``None`` for ``patch_size``, ``steps_per_epoch``, ``epochs`` or ``learning_rate`` takes the preset's default
    (:data:`PRESET_DEFAULTS`). ``val_cases`` (a count) overrides ``val_fraction``. Each field is also the
    command-line option of the same name (its help text is in the field's metadata).
    """

    data: Path = option(help="BraTS dataset folder holding one folder per case (cases without a seg are skipped), "
                             "or a pack file written by `brainscan train pack` (trains without the NIfTI files)")
    arch: str = option(choices=ARCHITECTURES, help="unet3d (3D U-Net) or attention_unet3d (attention-gated skips)")
    out: Path = option(Path("models"), help="model store folder (default: models)")
    preset: str = option("full", choices=tuple(PRESET_DEFAULTS),
                         help="network size: full for real use, tiny for tests and CPU smoke runs (default full)")
    patch_size: int | None = option(None, help=f"training patch side in voxels, a multiple of 8 (default "
                                               f"{_FULL['patch_size']}; tiny {_TINY['patch_size']}); also the "
                                               "served sliding-window size")
    batch_size: int = option(2, help="patches per device and step (default 2)")
    epochs: int | None = option(None, help=f"default {_FULL['epochs']} (tiny {_TINY['epochs']})")
    steps_per_epoch: int | None = option(None, help=f"batches per epoch (default {_FULL['steps_per_epoch']}; "
                                                    f"tiny {_TINY['steps_per_epoch']})")
    learning_rate: float | None = option(None, help=f"peak AdamW learning rate (default "
                                                    f"{_FULL['learning_rate']:g}; tiny {_TINY['learning_rate']:g})")
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    val_fraction: float = option(0.15, group="split", help="share of the cases held out for validation (default 0.15)")
    val_cases: int | None = option(None, group="split", help="number of validation cases instead")
    folds: int | None = option(None, group="split", metavar="K",
                               help="cross-validation: cut the cases (shuffled with --seed) into K folds and validate "
                                    "on fold --fold; the K runs validate on every case once (summarise them with "
                                    "`brainscan train cv-summary`)")
    fold: int | None = option(None, metavar="I", help="with --folds K: the fold this run validates on, 0..K-1")
    val_every: int = option(5, help="validate on whole volumes every N epochs, and after the last (default 5)")
    patience: int = option(30, help="stop when the validation Dice has not improved for N epochs (default 30)")
    max_minutes: float | None = option(None, metavar="M",
                                       help="a time budget: stop at the first epoch end after M minutes of training "
                                            "(validating there), with the cosine learning-rate decay spread over "
                                            "those minutes instead of over --epochs (then only an upper bound): "
                                            "for a lent GPU whose time is fixed and whose speed is not known ahead")
    max_cases: int | None = option(None, help="use at most N cases (smoke runs)")
    train_cases: int | None = option(None, help="train on N of the split's training cases (a seeded choice; runs "
                                                "of one --seed nest: 5 are among the 10), validating on the same "
                                                "cases as without it: for Dice against the number of training cases")
    foreground_fraction: float = option(1 / 3, help="share of patches centred on a tumour voxel (default 1/3)")
    augment: bool = option(True, flag="--no-augment", help="train on raw patches (no flips, no intensity jitter)")
    other_scanners: bool = option(False, help="also simulate other hospitals' scans in the patches: a smooth "
                                               "intensity bias field, blur and thick slices "
                                               "(training.augment.AugmentConfig.other_scanners)")
    overlap: float = option(0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    one_pass: bool = option(False, help="serve (and validate) by running the whole brain crop in one network call "
                                        "instead of sliding windows: faster when the crop is small, as at 2 mm")
    mirror_tta: bool = option(False, group="tta",
                              help="serve with test-time mirroring on the 3 axes (8x slower inference)")
    select_tta: bool = option(False, group="tta",
                              help="let the validation cases choose the served mirroring (none, left-right, 3 axes): "
                                   "a costlier one only when it gains 0.005 mean Dice; every candidate's Dice and "
                                   "seconds go into the manifest")
    target_spacing: float | None = option(None, metavar="MM",
                                          help="resample cases to this isotropic voxel size before the network, e.g. "
                                               "2 (8x fewer voxels than BraTS' 1 mm; masks come back at 1 mm). "
                                               "Default: keep the grid")
    # The serving side's OUTPUT_KINDS (brainscan.inference.segmenter), not imported here to keep --help light.
    outputs: str = option("classes", choices=("classes", "regions"),
                          help="classes: softmax over background/NCR/ED/ET; regions: sigmoids for the nested "
                               "whole tumour / tumour core / enhancing tumour (nnU-Net's BraTS setup)")
    soft_targets: bool = option(False, help="with --outputs regions and --target-spacing: train on each coarse voxel's "
                                            "fraction of each region (trilinear from the label file) instead of the "
                                            "nearest label, so that thin enhancing rims are not snapped to the coarse "
                                            "grid (bench/resolution_ceiling.py measures the ceiling of each)")
    deep_supervision: int = option(0, metavar="N",
                                   help="nnU-Net's deep supervision, in training only: a head on each of the N decoder "
                                        "levels below full resolution (at most 2 for these 4-level U-Nets), trained on "
                                        "the targets average-pooled to it, loss weights 1, 1/2, 1/4 normalised; the "
                                        "bundle serves the network without the heads (default 0: off)")
    init_from: Path | None = option(None, metavar="BUNDLE",
                                    help="start from a segmentation bundle's weights (same --arch, --preset and "
                                         "--outputs), to continue training in stages")
    seed: int = 0
    work_dir: Path | None = option(None, help="checkpoints, preprocessed cache and TensorBoard logs "
                                              "(default runs/segmenter-ARCH-PRESET-PATCHpx-seedS)")
    version: str | None = option(None, help="bundle version (default: a UTC timestamp)")
    resume: bool = option(False, help="continue from the checkpoint in --work-dir (same options; the learning-rate "
                                      "schedule and patch stream continue where they stopped)")
    promote: bool = option(False, help="make the new bundle the current version")
    overwrite: bool = option(False, help="replace a bundle of the same version")
    weights_dtype: str = option("float16", choices=("float16", "float32"),
                                help="dtype of the stored weights (float16 halves the bundle size)")
    mixed_precision: str = option("auto", choices=MIXED_PRECISION_CHOICES,
                                  help="auto: float16 compute on GPUs only; bf16: bfloat16 compute (fast on CPUs "
                                       "with avx512_bf16 or AMX)")
    demo: bool = option(False, help="mark the bundle as a demo (not for real use)")
    progress: str = option("keras", choices=("keras", "tqdm", "none"), cli=False)
    command: str = option(cli=False, default_factory=lambda: shlex.join(["brainscan", *sys.argv[1:]]))

    def augment_config(self) -> Any:
        """The patches' :class:`~training.augment.AugmentConfig` (``None``: raw patches)."""
        from training.augment import AugmentConfig

        if not self.augment:
            return None
        return AugmentConfig.other_scanners() if self.other_scanners else AugmentConfig()

    def __post_init__(self) -> None:
        from brainscan.models.unet3d import PRESETS, spatial_divisor
        from training.deep_supervision import max_heads

        check_choices(self)
        if self.other_scanners and not self.augment:
            raise ValueError("other_scanners adds to the augmentation: it cannot go with --no-augment")
        for name, value in PRESET_DEFAULTS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        divisor = spatial_divisor(PRESETS[self.preset]["levels"])
        heads = max_heads(PRESETS[self.preset]["levels"])
        if not 0 <= self.deep_supervision <= heads:
            raise ValueError(f"deep_supervision must be in [0, {heads}] for the {self.preset} preset, "
                             f"got {self.deep_supervision}")
        if self.patch_size < divisor or self.patch_size % divisor:
            raise ValueError(f"patch_size must be a positive multiple of {divisor} (the U-Net's downsampling), "
                             f"got {self.patch_size}")
        for name in ("epochs", "batch_size", "steps_per_epoch", "val_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_cases is not None and self.val_cases < 1:
            raise ValueError(f"val_cases must be at least 1, got {self.val_cases}")
        if (self.folds is None) != (self.fold is None):
            raise ValueError("folds and fold go together: --folds K --fold I trains on all but the I-th of K folds")
        if self.folds is not None:
            if self.folds < 2 or not 0 <= self.fold < self.folds:
                raise ValueError(f"folds must be >= 2 and fold in [0, folds), got folds {self.folds}, fold {self.fold}")
            if self.val_cases is not None:
                raise ValueError("val_cases and folds both choose the validation cases: give one of them")
        if self.train_cases is not None and self.train_cases < 1:
            raise ValueError(f"train_cases must be at least 1, got {self.train_cases}")
        if self.max_cases is not None and self.max_cases < 2:
            raise ValueError(f"max_cases must be at least 2 (one to train, one to validate), got {self.max_cases}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if not (self.learning_rate > 0 and self.weight_decay >= 0):
            raise ValueError(f"learning_rate must be > 0 and weight_decay >= 0, got {self.learning_rate}, "
                             f"{self.weight_decay}")
        if self.mirror_tta and self.select_tta:
            raise ValueError("mirror_tta serves with mirroring always; select_tta lets validation choose: give one")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.target_spacing is not None and not self.target_spacing > 0:
            raise ValueError(f"target_spacing must be > 0 mm, got {self.target_spacing}")
        if self.soft_targets and (self.outputs != "regions" or self.target_spacing is None):
            raise ValueError("soft_targets are region fractions on a resampled grid: they need --outputs regions "
                             "and a --target-spacing")
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
        self.data, self.out = Path(self.data), Path(self.out)
        if self.work_dir is None:
            fold = f"-fold{self.fold}of{self.folds}" if self.folds is not None else ""
            self.work_dir = Path("runs") / f"segmenter-{self.arch}-{self.preset}-{self.patch_size}px-seed{self.seed}{fold}"
        self.work_dir = Path(self.work_dir)
        if self.version is None:
            self.version = time.strftime("%Y%m%d-%H%M%S", time.gmtime())

    @property
    def divisor(self) -> int:
        """Every preprocessed size is a multiple of this (the U-Net's total downsampling)."""
        from brainscan.models.unet3d import PRESETS, spatial_divisor

        return spatial_divisor(PRESETS[self.preset]["levels"])

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        return (0, 1, 2) if self.mirror_tta else ()

    def inference(self) -> dict[str, Any]:
        """The bundle's sliding-window settings."""
        return {"patch_size": [self.patch_size] * 3, "overlap": self.overlap, "batch_size": self.batch_size,
                "mirror_axes": list(self.mirror_axes)}

    def preprocess_config(self) -> Any:
        from brainscan.preprocess.volume3d import VolumePreprocessConfig

        # Every BraTS case is stored in LPS voxel order; serving brings other orientations to it.
        return VolumePreprocessConfig(divisor=self.divisor, target_spacing=self.target_spacing, orientation="LPS")

    def arch_args(self) -> dict[str, Any]:
        """The registered builder's arguments (recorded in the manifest)."""
        if self.outputs == "regions":
            from brainscan.labels import REGION_ORDER

            return {"num_classes": len(REGION_ORDER), "in_channels": 4, "preset": self.preset, "output": "sigmoid"}
        return {"num_classes": len(BRATS_LABELS), "in_channels": 4, "preset": self.preset}

    def segmenter(self, model: Any, predict_fn: Any = None) -> Any:
        """The :class:`~brainscan.inference.segmenter.Segmenter` the bundle will serve, around ``model``."""
        from brainscan.inference.segmenter import Segmenter

        return Segmenter(model, self.preprocess_config(), patch_size=(self.patch_size,) * 3, overlap=self.overlap,
                         batch_size=self.batch_size, mirror_axes=self.mirror_axes, one_pass=self.one_pass,
                         outputs=self.outputs,
                         predict_fn=predict_fn)
