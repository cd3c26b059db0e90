"""Run a few independent file reads or writes at once (one per modality of a case).

zlib (gzip NIfTI), file I/O and most numpy work release the GIL, so a case's four volumes decode or
encode in parallel threads on a machine with spare cores. Results come back in input order, and
the first error in input order is the one raised, as a plain loop would.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """Cores this process may run on (``taskset`` and container CPU sets included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def in_threads(function: Callable[[T], R], items: Sequence[T], max_workers: int | None = None) -> list[R]:
    """``[function(item) for item in items]``, run on up to ``max_workers`` threads (default: the usable
    cores), in one thread when there is one core or one item.

    Raises:
        the first exception, in the order of ``items``, after every call has finished (no call is
        left running in the background).
    """
    workers = min(len(items), max_workers or usable_cores())
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(function, item) for item in items]
    return [future.result() for future in futures]


__all__ = ["in_threads", "usable_cores"]
