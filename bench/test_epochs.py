"""Held-out accuracy of the test suite's classifier convergence runs at other epoch counts.

``tests/training/test_classifier_training.py`` trains each tiny classifier on phantoms and requires
a held-out accuracy of at least 0.36 (chance is 0.25); ``tests/training/classifier_common.py`` sets
each architecture's epochs. This trains the same runs (same data, sizes, learning rates) for each
``--epochs`` value and prints the held-out accuracy and the training time, to choose epochs that keep
a margin over the bar. Not a test: it asserts nothing, it prints figures.

Usage:
  .venv/bin/python bench/test_epochs.py --epochs 30 15 --arch resnet50 vit_cnn [--input-size 48]
(``--input-size`` tries another network input than the tests' INPUT_SIZE, on the same phantoms.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[30, 15])
    parser.add_argument("--arch", nargs="+", default=["resnet50", "vit_cnn"], choices=["resnet50", "vit_cnn"])
    parser.add_argument("--input-size", type=int, default=None, help="network input (default: the tests' INPUT_SIZE)")
    args = parser.parse_args()

    from brainscan.cli.main import main as cli
    from brainscan.data.phantoms.kaggle import write_kaggle_phantoms
    from tests.training import classifier_common as common

    root = Path(tempfile.mkdtemp(prefix="brainscan-test-epochs-"))
    write_kaggle_phantoms(root / "train", n=common.TRAIN_IMAGES, seed=0, size=common.PHANTOM_SIZE)
    write_kaggle_phantoms(root / "held_out", n=common.HELD_OUT_IMAGES, seed=1, size=common.PHANTOM_SIZE,
                          split="Testing")
    for arch in args.arch:
        for epochs in args.epochs:
            out, work, report = (root / f"{kind}-{arch}-{epochs}" for kind in ("models", "work", "report"))
            command = common.train_command(root / "train", arch, out, work)
            command[command.index("--epochs") + 1] = str(epochs)
            command[command.index("--patience") + 1] = str(epochs)
            if args.input_size:
                command[command.index("--input-size") + 1] = str(args.input_size)
            started = time.perf_counter()
            if cli(command) != 0:
                raise SystemExit(f"training {arch} for {epochs} epochs failed")
            seconds = time.perf_counter() - started
            bundle = out / "classification" / arch / "test-1"
            if cli(["evaluate", str(bundle), str(root / "held_out"), "--out", str(report), "--quiet"]) != 0:
                raise SystemExit(f"evaluating {bundle} failed")
            accuracy = json.loads((report / "report.json").read_text())["splits"]["Testing"]["accuracy"]
            print(f"{arch:<9} {epochs:3d} epochs at {command[command.index('--input-size') + 1]} px: held-out accuracy {accuracy:.3f}, trained in {seconds:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
