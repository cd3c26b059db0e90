"""The ``brainscan`` command line: one entry point, one subcommand per area.

Each area module exposes ``register(subparsers)`` that adds its commands; a command is a function
``run(args) -> int`` stored as ``args.func``. Errors meant for users (bad data, bad files, missing
bundles) are printed as one line and give exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence

from brainscan import __version__
from brainscan.errors import BrainscanError

#: Areas of the command line, in the order ``brainscan --help`` lists them.
AREAS = ("brainscan.cli.data", "brainscan.cli.train", "brainscan.cli.metrics", "brainscan.cli.models",
         "brainscan.cli.evaluate", "brainscan.cli.predict", "brainscan.cli.up", "brainscan.cli.client")

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE_OR_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainscan",
        description=(
            "Brain MRI tumour classification (2D slices) and segmentation (3D BraTS volumes). "
            "Research software: NOT for clinical use."
        ),
        epilog="Run 'brainscan COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"brainscan {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for area in AREAS:
        importlib.import_module(area).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # The command as typed, recorded in the manifests of trained bundles (also when main() is called
    # with an argument list rather than from the shell).
    args.command_line = shlex.join(["brainscan", *argv])
    try:
        return int(args.func(args) or 0)
    except BrainscanError as exc:
        print(f"brainscan: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE_OR_INPUT
    except FileNotFoundError as exc:
        print(f"brainscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE_OR_INPUT
    except KeyboardInterrupt:
        print("brainscan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
