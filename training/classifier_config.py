"""The options of a classifier training run: :class:`ClassifierTrainConfig`, also ``brainscan train classifier``'s
command line (:mod:`training.options`), stored in the bundle manifest for reproduction."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.options import check_choices, option

ARCHITECTURES = ("resnet50", "vit_cnn")


@dataclass
class ClassifierTrainConfig:
    """Every knob of a classifier training run; stored in the bundle manifest for reproduction.

    Each field is also the command-line option of the same name (its help text is in the field's metadata).
    """

    data: Path = option(help="Kaggle-layout folder (holding Training/) or the Training folder itself")
    arch: str = option(choices=ARCHITECTURES)
    out: Path = option(Path("models"), help="model store folder (default: models)")
    input_size: int = option(128, help="image side in pixels (default 128)")
    preset: str = option("full", choices=("full", "tiny"),
                         help="network size: full for real use, tiny for tests and smoke runs (default full)")
    epochs: int = 30
    batch_size: int = option(32, help="per device (default 32)")
    learning_rate: float = option(1e-3, help="peak AdamW learning rate")
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    val_fraction: float = 0.15
    patience: int = option(6, help="early stopping patience in epochs")
    seed: int = 0
    work_dir: Path | None = option(None, help="checkpoints and TensorBoard logs "
                                              "(default runs/classifier-ARCH-PRESET-SIZEpx-seedS)")
    version: str | None = option(None, help="bundle version (default: a UTC timestamp)")
    resume: bool = option(False, help="continue from the checkpoint in --work-dir")
    promote: bool = option(False, help="make the new bundle the current version")
    weights_dtype: str = option("float16", choices=("float16", "float32"),
                                help="dtype of the stored weights (float16 halves the bundle size)")
    mixed_precision: str = option("auto", choices=("auto", "on", "off"), help="auto: float16 compute on GPUs only")
    max_per_class: int | None = option(None, help="use at most N training images per class (smoke runs; marks the "
                                                  "bundle as demo)")
    init_from: str | None = option(None, metavar="BUNDLE",
                                   help="start from this classifier bundle's weights (a folder, or ARCH for the "
                                        "current version in --out): fine-tuning, e.g. at a larger --input-size (a "
                                        "ViT-CNN's position embeddings are resized to the new token grid)")
    ema: float | None = option(None, metavar="MOMENTUM",
                               help="keep an exponential moving average of the weights with this momentum (e.g. "
                                    "0.998); validation, the best checkpoint and the bundle then use the averaged "
                                    "weights (and batch-norm statistics averaged alongside, so that they fit those "
                                    "weights)")
    label_smoothing: float = option(0.0, metavar="EPS",
                                    help="train on targets smoothed towards the uniform distribution by EPS (e.g. "
                                         "0.1; Szegedy et al. 2016); default 0")
    mixup: float | None = option(None, metavar="ALPHA",
                                 help="mix pairs of training images and their labels with a Beta(ALPHA, ALPHA) "
                                      "weight (Zhang et al. 2018), e.g. 0.2")
    cutmix: float | None = option(None, metavar="FACTOR",
                                  help="paste a box of another training image into each one, mixing the labels by "
                                       "area (Yun et al. 2019), e.g. 1.0; with --mixup the batches take turns")
    crop_scale: float | None = option(None, metavar="S",
                                      help="random resized crops: each training image is shifted and zoomed in on "
                                           "a part of S to 1 of its side length, per axis (so the aspect ratio "
                                           "varies too), e.g. 0.75")
    teacher: str | None = option(None, metavar="BUNDLE",
                                 help="distil from this classifier bundle (a folder, or ARCH for the current "
                                      "version in --out), as DeiT does: each target becomes (1 - W) x label + W x "
                                      "the teacher's served probabilities on the same augmented batch")
    teacher_weight: float = option(0.5, metavar="W", help="the teacher's share W of each target (default 0.5)")
    command: str = option(cli=False, default_factory=lambda: shlex.join(["brainscan", *sys.argv[1:]]))

    def __post_init__(self) -> None:
        check_choices(self)
        if self.input_size < 32 or self.input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16 and at least 32, got {self.input_size}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be in (0, 1), got {self.ema}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup is not None and self.mixup <= 0.0:
            raise ValueError(f"mixup must be a positive Beta parameter, got {self.mixup}")
        if self.cutmix is not None and not 0.0 < self.cutmix <= 1.0:
            raise ValueError(f"cutmix must be in (0, 1], got {self.cutmix}")
        if not 0.0 < self.teacher_weight <= 1.0:
            raise ValueError(f"teacher_weight must be in (0, 1], got {self.teacher_weight}")
        if self.crop_scale is not None and not 0.25 <= self.crop_scale < 1.0:
            raise ValueError(f"crop_scale must be in [0.25, 1), got {self.crop_scale}")
        self.data, self.out = Path(self.data), Path(self.out)
        if self.work_dir is None:
            self.work_dir = Path("runs") / f"classifier-{self.arch}-{self.preset}-{self.input_size}px-seed{self.seed}"
        self.work_dir = Path(self.work_dir)
        if self.version is None:
            self.version = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
