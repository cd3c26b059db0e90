"""Tests of brainscan.io.parallel.in_threads: a loop's results and errors, run on threads."""

from __future__ import annotations

import threading
import time

import pytest

from brainscan.io.parallel import in_threads, usable_cores


def test_results_in_input_order_on_several_threads() -> None:
    seen = set()

    def slow_square(x: int) -> int:
        seen.add(threading.get_ident())
        time.sleep(0.02 * (5 - x))  # later items finish first
        return x * x

    assert in_threads(slow_square, [1, 2, 3, 4], max_workers=4) == [1, 4, 9, 16]
    assert len(seen) > 1
    assert in_threads(slow_square, [3], max_workers=4) == [9]
    assert in_threads(slow_square, [], max_workers=4) == []


def test_first_error_in_input_order_after_all_calls_finished() -> None:
    finished = []

    def check(x: int) -> int:
        time.sleep(0.01 * (4 - x))
        finished.append(x)
        if x in (2, 3):
            raise ValueError(f"bad {x}")
        return x

    with pytest.raises(ValueError, match="bad 2"):
        in_threads(check, [1, 2, 3, 4], max_workers=4)
    assert sorted(finished) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="bad 2"):  # one thread: a plain loop, stopped at the error
        in_threads(check, [1, 2, 3, 4], max_workers=1)


def test_usable_cores_is_positive() -> None:
    assert usable_cores() >= 1
