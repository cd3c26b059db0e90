"""``brainscan train segmenter``, ``pack``, ``cv-summary`` and ``ensemble``: the commands around
:func:`training.segmenter.train_segmenter`.

The segmenter's options are the fields of :class:`~training.segmenter_config.SegmenterTrainConfig`
(help texts included), turned into a parser by :mod:`training.options` exactly as the classifier's
(:mod:`training.classifier_cli`); this module adds the command's description and examples. The
``train`` area registers it with :func:`add_segmenter_parser`. Nothing here imports TensorFlow, so
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from training import options
from training.options import LOG_FORMAT, add_trainer_parser, run_trainer
from training.segmenter_config import PRESET_DEFAULTS, SegmenterTrainConfig

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
    """Add ``segmenter`` to the ``brainscan train`` subcommands; returns its parser.

    Its options are :class:`~training.segmenter_config.SegmenterTrainConfig`'s fields (:mod:`training.options`).
    """
    return add_trainer_parser(
        commands, "segmenter", SegmenterTrainConfig, run_segmenter,
        help="train a 3D U-Net or Attention U-Net on BraTS volumes (needs a GPU for real models)",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )


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


def add_ensemble_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ensemble`` to the ``brainscan train`` subcommands; returns its parser."""
    parser = commands.add_parser(
        "ensemble", help="write the K fold runs of a segmenter cross-validation as one bundle that averages them",
        description="Check that the bundles are all K runs of `brainscan train segmenter --folds K --fold I` "
                    "(same data, seed, network, preprocessing), predict every case of --data with the fold that "
                    "validated on it, choose the post-processing (and with --select-tta the mirroring) on those "
                    "pooled cross-validation predictions, and write one bundle whose network averages the K "
                    "members' probabilities. Its Dice is the pooled cross-validation figure: the ensemble itself "
                    "trained on every case.")
    parser.add_argument("bundles", nargs="+", type=Path, help="the fold runs' bundle folders (all K folds)")
    parser.add_argument("--data", type=Path, required=True,
                        help="the dataset folder or pack the folds trained on (checked by fingerprint)")
    parser.add_argument("--out", type=Path, default=Path("models"), help="model store folder (default: models)")
    parser.add_argument("--version", required=True, help="version of the ensemble bundle")
    parser.add_argument("--select-tta", action="store_true",
                        help="let the pooled cross-validation predictions choose the served mirroring "
                             "(none, left-right, 3 axes), as `train segmenter --select-tta` does")
    parser.add_argument("--weights-dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--promote", action="store_true", help="make the ensemble the current version")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle of that version")
    parser.set_defaults(func=run_ensemble)
    return parser


def run_ensemble(args: argparse.Namespace) -> int:
    import shlex

    from training.ensemble import write_ensemble

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    command = "brainscan train ensemble " + shlex.join(
        [*map(str, args.bundles), "--data", str(args.data), "--out", str(args.out), "--version", args.version,
         *(["--select-tta"] if args.select_tta else []), "--weights-dtype", args.weights_dtype])
    path = write_ensemble(args.bundles, args.data, args.out, args.version, select_tta=args.select_tta,
                          weights_dtype=args.weights_dtype, overwrite=args.overwrite, promote=args.promote,
                          command=command)
    print(f"ensemble bundle written: {path}")
    return 0


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
    from training.segmenter import labelled_cases

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
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


def config_from_args(args: argparse.Namespace) -> SegmenterTrainConfig:
    """Build the :class:`~training.segmenter_config.SegmenterTrainConfig` of parsed arguments.

    Raises:
        ValueError: a value the config rejects (the message names it).
    """
    return options.config_from_args(SegmenterTrainConfig, args)


def run_segmenter(args: argparse.Namespace) -> int:
    from training.segmenter import train_segmenter

    return run_trainer(args, SegmenterTrainConfig, train_segmenter, "segmenter")
