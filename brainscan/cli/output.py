"""Printing helpers shared by the CLI commands: JSON that never fails on numpy types, and tables."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """Replace NaN/inf floats by None, recursively: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(data: Any) -> str:
    return json.dumps(_finite(data), default=_default, indent=2, allow_nan=False)


def print_json(data: Any) -> None:
    print(dumps(data))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


#: Seconds between redraws of a progress bar whose stderr is a file or pipe (a log gets a handful of
#: lines a run, not one per patch).
LOG_REDRAW_S = 30.0


def progress_bar(*, quiet: bool, unit: str, total: int | None = None, leave: bool = True, **options: Any) -> Any:
    """A tqdm bar on stderr: redrawn 10 times a second on a terminal, every :data:`LOG_REDRAW_S` s otherwise."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, unit=unit, file=sys.stderr, disable=quiet, dynamic_ncols=interactive, leave=leave,
                mininterval=0.1 if interactive else LOG_REDRAW_S, **options)
