"""``brainscan train segmenter``: argument parsing for :func:`training.segmenter.train_segmenter`.

Kept apart from ``brainscan/cli/train.py`` so that the command's options live next to the
training code; the ``train`` area registers it with :func:`add_segmenter_parser`. Nothing here
imports TensorFlow, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from training.runtime import MIXED_PRECISION_CHOICES
from training.segmenter import ARCHITECTURES, PRESET_DEFAULTS

_DESCRIPTION = """\
Train a 3D brain-tumour segmenter from scratch on BraTS cases (BraTS 2020 is the target dataset;
the 2018-2021 layouts all work: one folder per case holding <case>_{t1,t1ce,t2,flair,seg}.nii[.gz])
and write a model bundle to OUT/segmentation/ARCH/VERSION/.

By default the network predicts background, necrotic core (label 1), edema (label 2) and enhancing
tumour (label 4); with --outputs regions it predicts the nested whole tumour / tumour core /
enhancing tumour regions (nnU-Net's BraTS setup), and with --target-spacing 2 it works on 2 mm voxels
(8x fewer than BraTS' 1 mm; masks still come back on the input grid). Every --val-every epochs it
segments the WHOLE validation volumes exactly as the segmenter service does (sliding window,
restored to the input grid) and scores the BraTS regions (whole tumour, tumour core, enhancing
tumour). Their mean Dice picks the best weights and stops training early; at the end the
post-processing (small components, a minimum enhancing-tumour volume) is switched on only where it
helps on the validation cases. A checkpoint is written after every epoch into --work-dir: rerun the
same command with --resume to continue an interrupted run, or start a new stage from a bundle with
--init-from.

A GPU is used unchanged when present (several: MirroredStrategy; float16 mixed precision). On 2 CPU
cores the full preset at 1 mm and 128^3 patches costs days; the shipped models use the small preset
at 2 mm with 48^3 patches (see README). For a quick smoke test use --preset tiny (4-32 filters,
32^3 patches, about a minute on phantoms from
`python -c "from brainscan.data.phantoms import write_brats_phantoms as w; w('/tmp/brats', n=12)"`).
"""

_EPILOG = """\
examples:
  # a real model on BraTS 2020 (GPU machine), made the served version when done
  brainscan train segmenter --data MICCAI_BraTS2020_TrainingData --arch unet3d --out models --promote

  # the shipped CPU recipe: small U-Net, 2 mm, region outputs (about an hour on 2 cores)
  brainscan train segmenter --data BRATS_DIR --arch unet3d --preset small --patch-size 48 --epochs 8 \
      --steps-per-epoch 100 --val-every 2 --val-cases 4 --learning-rate 2e-3 --foreground-fraction 0.5 \
      --target-spacing 2 --outputs regions --mixed-precision off --out models --promote

  # the attention variant, continuing an interrupted run
  brainscan train segmenter --data MICCAI_BraTS2020_TrainingData --arch attention_unet3d --resume

  # a CPU smoke run: tiny network, 12 cases (marked demo in the bundle)
  brainscan train segmenter --data /tmp/brats --arch unet3d --preset tiny --max-cases 12 --demo

Watch training with: tensorboard --logdir runs/
"""


def add_segmenter_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``segmenter`` to the ``brainscan train`` subcommands; returns its parser."""
    full, tiny = PRESET_DEFAULTS["full"], PRESET_DEFAULTS["tiny"]
    parser = commands.add_parser(
        "segmenter", help="train a 3D U-Net or Attention U-Net on BraTS volumes (needs a GPU for real models)",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True,
                        help="BraTS dataset folder holding one folder per case (cases without a seg are skipped), "
                             "or a pack file written by `brainscan train pack` (trains without the NIfTI files)")
    parser.add_argument("--arch", choices=ARCHITECTURES, required=True,
                        help="unet3d (3D U-Net) or attention_unet3d (attention-gated skips)")
    parser.add_argument("--out", type=Path, default=Path("models"), help="model store folder (default: models)")
    parser.add_argument("--preset", choices=tuple(PRESET_DEFAULTS), default="full",
                        help="network size: full for real use, tiny for tests and CPU smoke runs (default full)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help=f"training patch side in voxels, a multiple of 8 (default {full['patch_size']}; "
                             f"tiny {tiny['patch_size']}); also the served sliding-window size")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per device and step (default 2)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"default {full['epochs']} (tiny {tiny['epochs']})")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help=f"batches per epoch (default {full['steps_per_epoch']}; tiny {tiny['steps_per_epoch']})")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"peak AdamW learning rate "
                             f"(default {full['learning_rate']:g}; tiny {tiny['learning_rate']:g})")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.15,
                       help="share of the cases held out for validation (default 0.15)")
    split.add_argument("--val-cases", type=int, default=None, help="number of validation cases instead")
    split.add_argument("--folds", type=int, default=None, metavar="K",
                       help="cross-validation: cut the cases (shuffled with --seed) into K folds and validate on "
                            "fold --fold; the K runs validate on every case once (summarise them with "
                            "`brainscan train cv-summary`)")
    parser.add_argument("--fold", type=int, default=None, metavar="I",
                        help="with --folds K: the fold this run validates on, 0..K-1")
    parser.add_argument("--val-every", type=int, default=5,
                        help="validate on whole volumes every N epochs, and after the last (default 5)")
    parser.add_argument("--patience", type=int, default=30,
                        help="stop when the validation Dice has not improved for N epochs (default 30)")
    parser.add_argument("--max-cases", type=int, default=None, help="use at most N cases (smoke runs)")
    parser.add_argument("--foreground-fraction", type=float, default=1 / 3,
                        help="share of patches centred on a tumour voxel (default 1/3)")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train on raw patches (no flips, no intensity jitter)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--one-pass", action="store_true",
                        help="serve (and validate) by running the whole brain crop in one network call instead "
                             "of sliding windows: faster when the crop is small, as at 2 mm")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--mirror-tta", action="store_true",
                     help="serve with test-time mirroring on the 3 axes (8x slower inference)")
    tta.add_argument("--select-tta", action="store_true",
                     help="let the validation cases choose the served mirroring (none, left-right, 3 axes): a "
                          "costlier one only when it gains 0.005 mean Dice; every candidate's Dice and seconds "
                          "go into the manifest")
    parser.add_argument("--target-spacing", type=float, default=None, metavar="MM",
                        help="resample cases to this isotropic voxel size before the network, e.g. 2 "
                             "(8x fewer voxels than BraTS' 1 mm; masks come back at 1 mm). Default: keep the grid")
    parser.add_argument("--outputs", choices=("classes", "regions"), default="classes",
                        help="classes: softmax over background/NCR/ED/ET; regions: sigmoids for the nested "
                             "whole tumour / tumour core / enhancing tumour (nnU-Net's BraTS setup)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="BUNDLE",
                        help="start from a segmentation bundle's weights (same --arch, --preset and --outputs), "
                             "to continue training in stages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoints, preprocessed cache and TensorBoard logs "
                             "(default runs/segmenter-ARCH-PRESET-PATCHpx-seedS)")
    parser.add_argument("--version", default=None, help="bundle version (default: a UTC timestamp)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --work-dir (same options; the learning-rate "
                             "schedule and patch stream continue where they stopped)")
    parser.add_argument("--promote", action="store_true", help="make the new bundle the current version")
    parser.add_argument("--overwrite", action="store_true", help="replace a bundle of the same version")
    parser.add_argument("--weights-dtype", choices=("float16", "float32"), default="float16",
                        help="dtype of the stored weights (float16 halves the bundle size)")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, default="auto",
                        help="auto: float16 compute on GPUs only; bf16: bfloat16 compute (fast on CPUs "
                             "with avx512_bf16 or AMX)")
    parser.add_argument("--demo", action="store_true", help="mark the bundle as a demo (not for real use)")
    parser.set_defaults(func=run_segmenter)
    return parser


_PACK_DESCRIPTION = """\
Preprocess labelled BraTS cases once, exactly as `brainscan train segmenter` and serving do (brain
crop, z-score, orientation, --target-spacing), and write them into one compact file: float16
volumes, the crop records and each case's label map, deflated (about 2 MB a case at 2 mm).
`brainscan train segmenter --data PACK.npz` then trains from it with the same split, patches,
validation and data fingerprint as from the folder, without reading a NIfTI file and without
TensorFlow: on a GPU machine that has JAX instead, set KERAS_BACKEND=jax. A GPU machine lent here
receives at most 64 MiB of working tree, so keep the pack under that (a warning says when not).
"""

_PACK_EPILOG = """\
example (the shipped 2 mm recipe's cases; then carry runs/pack to the GPU machine):
  brainscan train pack --data BRATS_DIR --preset small --target-spacing 2 --out runs/pack/brats-2mm.npz
  KERAS_BACKEND=jax brainscan train segmenter --data runs/pack/brats-2mm.npz --arch unet3d --preset small \
      --target-spacing 2 --outputs regions --patch-size 64 --batch-size 8 --mixed-precision bf16 ...
"""


def add_pack_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pack`` to the ``brainscan train`` subcommands; returns its parser."""
    parser = commands.add_parser(
        "pack", help="preprocess BraTS cases into one compact file to train a segmenter from (GPU machines)",
        description=_PACK_DESCRIPTION, epilog=_PACK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="BraTS dataset folder (cases with a seg are packed)")
    parser.add_argument("--out", type=Path, required=True, help="the pack file to write (.npz)")
    parser.add_argument("--preset", choices=tuple(PRESET_DEFAULTS), default="full",
                        help="the network preset the pack will train (it sets the size divisor; default full)")
    parser.add_argument("--target-spacing", type=float, default=None, metavar="MM",
                        help="isotropic voxel size in mm, as the training run's --target-spacing (default: keep "
                             "the grid)")
    parser.add_argument("--max-cases", type=int, default=None, help="pack at most N cases (a seeded choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-cases choice")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="a training work folder's cache/ to reuse (default: preprocess afresh)")
    parser.set_defaults(func=run_pack)
    return parser


def add_cv_summary_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``cv-summary`` to the ``brainscan train`` subcommands; returns its parser."""
    parser = commands.add_parser(
        "cv-summary", help="pool the validation Dice and HD95 of the fold runs of a segmenter cross-validation",
        description="Read the bundles of the K runs of `brainscan train segmenter --folds K --fold I` (I = 0..K-1) "
                    "and print each fold's validation Dice and the per-case mean Dice and HD95 pooled over all "
                    "folds: every case scored by the fold that did not train on it.")
    parser.add_argument("bundles", nargs="+", type=Path, help="the fold runs' bundle folders")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run_cv_summary)
    return parser


def run_cv_summary(args: argparse.Namespace) -> int:
    import json

    from training.segmenter_validation import cross_validation_summary

    summary = cross_validation_summary(args.bundles)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for row in summary["per_fold"]:
        d = row["dice"]
        print(f"fold {row['fold']}: {len(row['cases'])} cases, Dice WT {d['WT']:.3f} TC {d['TC']:.3f} "
              f"ET {d['ET']:.3f}  ({row['bundle']})")
    d, h = summary["dice"], summary["hd95"]
    hd = "  ".join(f"{r} {h[r]:.1f}" if h[r] is not None else f"{r} -" for r in ("WT", "TC", "ET"))
    print(f"pooled over {summary['cases']} cases: Dice WT {d['WT']:.3f} TC {d['TC']:.3f} ET {d['ET']:.3f} "
          f"mean {d['mean']:.3f}; HD95 (mm) {hd}")
    if summary["folds_missing"]:
        print(f"folds missing: {summary['folds_missing']} of {summary['folds']}: the estimate covers only "
              "the folds given")
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from training.pack import write_pack
    from training.segmenter import SegmenterTrainConfig, labelled_cases

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # The preprocessing a training run with these options records (one definition of it).
        run = SegmenterTrainConfig(data=args.data, arch="unet3d", preset=args.preset,
                                   target_spacing=args.target_spacing, max_cases=args.max_cases)
    except ValueError as exc:
        raise SystemExit(f"brainscan train pack: {exc}") from exc
    cases = labelled_cases(args.data, args.max_cases, args.seed)
    path = write_pack(cases, run.preprocess_config(), args.out, cache_dir=args.cache_dir)
    print(f"pack written: {path} ({len(cases)} cases, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def config_from_args(args: argparse.Namespace):
    """Build the :class:`~training.segmenter.SegmenterTrainConfig` of parsed arguments.

    Raises:
        ValueError: a value the config rejects (the message names it).
    """
    from training.segmenter import SegmenterTrainConfig

    return SegmenterTrainConfig(
        data=args.data, arch=args.arch, out=args.out, preset=args.preset, patch_size=args.patch_size,
        batch_size=args.batch_size, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        val_fraction=args.val_fraction, val_cases=args.val_cases, folds=args.folds, fold=args.fold,
        val_every=args.val_every, patience=args.patience,
        max_cases=args.max_cases, seed=args.seed, work_dir=args.work_dir, version=args.version, resume=args.resume,
        promote=args.promote, overwrite=args.overwrite, weights_dtype=args.weights_dtype,
        mixed_precision=args.mixed_precision, foreground_fraction=args.foreground_fraction, augment=args.augment,
        overlap=args.overlap, mirror_tta=args.mirror_tta, select_tta=args.select_tta, one_pass=args.one_pass,
        demo=args.demo,
        target_spacing=args.target_spacing,
        outputs=args.outputs, init_from=args.init_from,
        **({"command": args.command_line} if getattr(args, "command_line", None) else {}),
    )


def run_segmenter(args: argparse.Namespace) -> int:
    from training.segmenter import train_segmenter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"brainscan train segmenter: {exc}") from exc
    bundle = train_segmenter(config)
    print(f"bundle written: {bundle}")
    return 0
