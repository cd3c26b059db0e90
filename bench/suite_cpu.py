"""Wall time and CPU time of every test, to see where the suite's minutes go (a pytest plugin; Linux).

A test's CPU time is the pytest process's own (all threads) plus that of every process it started: the
servers, workers and CLI runs, counted while they live (from /proc) and once they are reaped. Wall time
well above CPU time on an otherwise idle core is waiting (sleeps, timeouts, polling), which on a 2-core CI
machine costs as much as work. Not a test: it asserts nothing, it prints figures.

Usage (one process on one core, so that wall minus CPU is waiting, not sharing):
  OMP_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 PYTHONPATH=bench \\
    taskset -c 0 .venv/bin/python -m pytest -p suite_cpu -p no:cacheprovider -q [TESTS]
  (SUITE_CPU_OUT=FILE also writes every test's [nodeid, wall s, CPU s] as JSON.)
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import Counter
from pathlib import Path

import pytest

_TICKS = os.sysconf("SC_CLK_TCK")
_rows: list[tuple[str, float, float]] = []


def _descendants_cpu(root: int) -> float:
    """CPU seconds of the live descendants of ``root`` (user + system, from /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
    total, stack = 0.0, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + _descendants_cpu(os.getpid())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ANN001, ARG001 (pytest hook)
    wall, cpu = time.perf_counter(), _cpu()
    yield
    _rows.append((item.nodeid, time.perf_counter() - wall, _cpu() - cpu))


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 (pytest hook)
    walls, cpus = Counter(), Counter()
    for nodeid, wall, cpu in _rows:
        path = nodeid.split("::", 1)[0]
        walls[path] += wall
        cpus[path] += cpu
    write = terminalreporter.write_line
    write(f"suite_cpu: {len(_rows)} tests, wall {sum(walls.values()):.0f} s, CPU {sum(cpus.values()):.0f} s")
    write(f"{'wall s':>8} {'CPU s':>8} {'wait s':>8}  file (the 25 longest)")
    for path, wall in walls.most_common(25):
        write(f"{wall:8.1f} {cpus[path]:8.1f} {wall - cpus[path]:8.1f}  {path}")
    if os.environ.get("SUITE_CPU_OUT"):
        Path(os.environ["SUITE_CPU_OUT"]).write_text(json.dumps(_rows))
