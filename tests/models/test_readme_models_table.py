"""The README's model table quotes each bundle's manifest: the same figures, the same current version.

A figure typed by hand drifts: the table once said 0.955 for a bundle whose manifest says 0.95449.
Here every row that names a bundle under ``models/`` is read back: the first validation figure of
its last column (``accuracy`` for classifiers; ``WT``, ``TC``, ``ET`` for segmenters) must be the
manifest's value rounded to the digits the README prints, and "(current)" must mark exactly the
versions that ``CURRENT`` names. No TensorFlow: this reads text and JSON.
"""

from __future__ import annotations

import re

import pytest

from brainscan.models.bundle import read_spec
from tests.paths import REPO_ROOT

README = REPO_ROOT / "README.md"
MODELS = REPO_ROOT / "models"
ROW = re.compile(r"^\| `((?:classification|segmentation)/[a-z0-9_]+/[A-Za-z0-9._-]+)`( \(current\))? \|(.*)\|\s*$")


def _rows() -> list[tuple[str, bool, str]]:
    rows = []
    for line in README.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            rows.append((match.group(1), bool(match.group(2)), match.group(3)))
    return rows


ROWS = _rows()


def _quoted(cells: str, name: str) -> tuple[float, int] | None:
    """``(value, decimals)`` of the first ``NAME 0.123`` or ``NAME **0.123**`` in the figures column."""
    figures = cells.split("|")[-2]
    match = re.search(rf"\b{name} \**(\d\.\d+)\**", figures)
    if match is None:
        return None
    text = match.group(1)
    return float(text), len(text.split(".")[1])


def _assert_rounds_to(quoted: tuple[float, int], actual: float, what: str) -> None:
    value, decimals = quoted
    assert abs(actual - value) <= 0.5 * 10**-decimals + 1e-12, (
        f"{what}: the README says {value:.{decimals}f}, the manifest {actual:.5f} "
        f"(which prints as {actual:.{decimals}f})"
    )


def test_the_table_names_shipped_bundles() -> None:
    assert len(ROWS) >= 4, "no model rows found in the README's table"
    for bundle, _, _ in ROWS:
        assert (MODELS / bundle / "manifest.json").is_file(), f"the README's table names {bundle}, which is not shipped"


@pytest.mark.parametrize(("bundle", "current", "cells"), ROWS, ids=[r[0] for r in ROWS])
def test_each_row_quotes_its_manifest(bundle: str, current: bool, cells: str) -> None:
    folder = MODELS / bundle
    metrics = read_spec(folder).metrics
    named = (folder.parent / "CURRENT").read_text(encoding="utf-8").strip()
    assert current == (named == folder.name), (
        f"{bundle}: the README {'marks' if current else 'does not mark'} it current, CURRENT names {named}"
    )
    if bundle.startswith("classification/"):
        quoted = _quoted(cells, "accuracy")
        assert quoted is not None, f"{bundle}: no 'accuracy' figure in its row"
        _assert_rounds_to(quoted, metrics["validation"]["accuracy"], f"{bundle} accuracy")
    else:
        checked = 0
        for region in ("WT", "TC", "ET"):
            quoted = _quoted(cells, region)
            if quoted is not None:
                _assert_rounds_to(quoted, metrics["dice"][region], f"{bundle} {region} Dice")
                checked += 1
        assert checked == 3, f"{bundle}: its row should quote WT, TC and ET Dice"
