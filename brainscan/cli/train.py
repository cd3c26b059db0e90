"""``brainscan train``: train the classifiers and the segmenters (code in the ``training`` package)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a classifier or a segmenter and write a model bundle",
                                  description="Train a model from scratch and write a bundle into the model store.")
    commands = train.add_subparsers(title="train commands", metavar="COMMAND", required=True)

    clf = commands.add_parser(
        "classifier",
        help="train ResNet50 or the hybrid ViT-CNN on a Kaggle-layout folder",
        description=(
            "Train a 4-class tumour classifier (glioma, meningioma, notumor, pituitary) from scratch on "
            "the Training split of a Kaggle Brain Tumor MRI folder, with a duplicate-aware stratified "
            "validation split, and write the bundle to OUT/classification/ARCH/VERSION/. A checkpoint is "
            "written after every epoch into --work-dir; rerun with --resume to continue an interrupted "
            "run. Uses every GPU present (mixed precision) and runs unchanged on CPU."
        ),
    )
    clf.add_argument("--data", type=Path, required=True,
                     help="Kaggle-layout folder (holding Training/) or the Training folder itself")
    clf.add_argument("--arch", choices=("resnet50", "vit_cnn"), required=True)
    clf.add_argument("--out", type=Path, default=Path("models"), help="model store folder (default: models)")
    clf.add_argument("--input-size", type=int, default=128, help="image side in pixels (default 128)")
    clf.add_argument("--preset", choices=("full", "tiny"), default="full",
                     help="network size: full for real use, tiny for tests and smoke runs (default full)")
    clf.add_argument("--epochs", type=int, default=30)
    clf.add_argument("--batch-size", type=int, default=32, help="per device (default 32)")
    clf.add_argument("--learning-rate", type=float, default=1e-3, help="peak AdamW learning rate")
    clf.add_argument("--weight-decay", type=float, default=5e-4)
    clf.add_argument("--warmup-epochs", type=int, default=1)
    clf.add_argument("--val-fraction", type=float, default=0.15)
    clf.add_argument("--patience", type=int, default=6, help="early stopping patience in epochs")
    clf.add_argument("--seed", type=int, default=0)
    clf.add_argument("--work-dir", type=Path, default=None,
                     help="checkpoints and TensorBoard logs (default runs/classifier-ARCH-PRESET-SIZEpx-seedS)")
    clf.add_argument("--version", default=None, help="bundle version (default: a UTC timestamp)")
    clf.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    clf.add_argument("--promote", action="store_true", help="make the new bundle the current version")
    clf.add_argument("--weights-dtype", choices=("float16", "float32"), default="float16",
                     help="dtype of the stored weights (float16 halves the bundle size)")
    clf.add_argument("--mixed-precision", choices=("auto", "on", "off"), default="auto",
                     help="auto: float16 compute on GPUs only")
    clf.add_argument("--max-per-class", type=int, default=None,
                     help="use at most N training images per class (smoke runs; marks the bundle as demo)")
    clf.add_argument("--init-from", default=None, metavar="BUNDLE",
                     help="start from this classifier bundle's weights (a folder, or ARCH for the current "
                          "version in --out): fine-tuning, e.g. at a larger --input-size (a ViT-CNN's position "
                          "embeddings are resized to the new token grid)")
    clf.add_argument("--ema", type=float, default=None, metavar="MOMENTUM",
                     help="keep an exponential moving average of the weights with this momentum (e.g. 0.998); "
                          "validation, the best checkpoint and the bundle then use the averaged weights (and "
                          "batch-norm statistics averaged alongside, so that they fit those weights)")
    clf.set_defaults(func=run_classifier)

    from training.segmenter_cli import add_cv_summary_parser, add_pack_parser, add_segmenter_parser

    add_segmenter_parser(commands)
    add_pack_parser(commands)
    add_cv_summary_parser(commands)


def run_classifier(args: argparse.Namespace) -> int:
    from training.classifier import ClassifierTrainConfig, train_classifier

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ClassifierTrainConfig(
            data=args.data, arch=args.arch, out=args.out, input_size=args.input_size, preset=args.preset,
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, val_fraction=args.val_fraction,
            patience=args.patience, seed=args.seed, work_dir=args.work_dir, version=args.version,
            resume=args.resume, promote=args.promote, weights_dtype=args.weights_dtype,
            mixed_precision=args.mixed_precision, max_per_class=args.max_per_class,
            init_from=args.init_from, ema=args.ema, command=args.command_line,
        )
    except ValueError as exc:
        raise SystemExit(f"brainscan train classifier: {exc}") from exc
    bundle = train_classifier(config)
    print(f"bundle written: {bundle}")
    return 0
