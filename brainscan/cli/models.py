"""``brainscan models``: list the model store and promote versions."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainscan.cli.arguments import command_group


def register(subparsers: argparse._SubParsersAction) -> None:
    models, commands = command_group(subparsers, "models", help="list model bundles, promote a version",
                                     description="Work with the model store models/<task>/<arch>/<version>/.")
    models.add_argument("--root", type=Path, default=None,
                        help="model store folder (default: $BRAINSCAN_MODELS or ./models)")
    listing = commands.add_parser("list", help="list every bundle with its version, demo flag and metrics",
                                  description="List every bundle in the model store; '*' marks the current version.")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_list)
    promote = commands.add_parser(
        "promote", help="make a version the current one (atomic; running services pick it up on restart)",
        description="Point models/<task>/<arch>/CURRENT at VERSION.")
    promote.add_argument("task", choices=("classification", "segmentation"))
    promote.add_argument("arch")
    promote.add_argument("version")
    promote.set_defaults(func=run_promote)

    from training.calibrate import add_calibrate_parser
    from training.demo import add_demo_parser

    add_demo_parser(commands)
    add_calibrate_parser(commands)


def _store(args: argparse.Namespace):
    from brainscan.models.store import ModelStore, default_root

    return ModelStore(args.root or default_root())


def run_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from brainscan.cli.output import print_json
    from brainscan.models.store import format_table

    store = _store(args)
    entries = store.list()
    if args.json:
        print_json([asdict(e) for e in entries])
    elif not entries:
        print(f"no model bundles under {store.root}")
    else:
        print(format_table(entries))
    return 0


def run_promote(args: argparse.Namespace) -> int:
    store = _store(args)
    store.promote(args.task, args.arch, args.version)
    print(f"{args.task}/{args.arch}: current version is now {args.version}")
    return 0
