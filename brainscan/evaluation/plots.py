"""PNG figures of evaluation reports: confusion matrices, per-class bars, Dice box plots.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas directly, never
through ``pyplot``: no global backend is switched, no window can open, and nothing is left in
pyplot's figure registry of a long-running process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.labels import REGION_NAMES, REGIONS

_DPI = 120
_METRIC_COLOURS = {"precision": "#4C72B0", "recall": "#DD8452", "f1": "#55A868"}
_REGION_COLOURS = {"WT": "#55A868", "TC": "#C44E52", "ET": "#8172B3"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=_DPI)
    return path


def _matrix_panel(axes: Any, matrix: np.ndarray, labels: Sequence[str], title: str, *, normalised: bool) -> None:
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalised else max(1, matrix.max()))
    axes.set_title(title, fontsize=10)
    ticks = np.arange(len(labels))
    axes.set_xticks(ticks, labels, rotation=30, ha="right", fontsize=8)
    axes.set_yticks(ticks, labels, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    threshold = (1 if normalised else matrix.max()) / 2
    for (row, col), value in np.ndenumerate(matrix):
        text = f"{value:.2f}" if normalised else f"{int(value)}"
        axes.text(col, row, text, ha="center", va="center", fontsize=8,
                  color="white" if value > threshold else "black")
    axes.figure.colorbar(image, ax=axes, shrink=0.8)


def plot_confusion_matrices(reports: Mapping[str, dict[str, Any]], path: str | Path) -> Path:
    """Confusion matrices of one or more splits: counts (left) and row-normalised recall (right).

    Args:
        reports: ``{split: classification_report(...)}``; one row of panels per split.
        path: the PNG file to write.

    Returns:
        ``path``.

    Raises:
        ValueError: ``reports`` is empty.
    """
    if not reports:
        raise ValueError("reports is empty: nothing to plot")
    figure = _figure(10, 4.4 * len(reports))
    grid = figure.subplots(len(reports), 2, squeeze=False)
    for (split, report), (left, right) in zip(reports.items(), grid):
        labels = report["confusion_matrix"]["labels"]
        counts = np.asarray(report["confusion_matrix"]["matrix"], dtype=np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        # A class with no true samples has an undefined row; it is drawn as zeros.
        normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        _matrix_panel(left, counts, labels, f"{split}: counts (n={int(counts.sum())})", normalised=False)
        _matrix_panel(right, normalised, labels, f"{split}: row-normalised (recall)", normalised=True)
    return _save(figure, path)


def plot_per_class_metrics(reports: Mapping[str, dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars of precision, recall and F1 per class, one panel per split; arguments, return
    value and errors as :func:`plot_confusion_matrices`."""
    if not reports:
        raise ValueError("reports is empty: nothing to plot")
    figure = _figure(9, 3.6 * len(reports))
    panels = figure.subplots(len(reports), 1, squeeze=False)[:, 0]
    width = 0.26
    for (split, report), axes in zip(reports.items(), panels):
        names = report["class_names"]
        positions = np.arange(len(names))
        for offset, metric in zip((-width, 0.0, width), _METRIC_COLOURS):
            values = [report["per_class"][name][metric] for name in names]
            bars = axes.bar(positions + offset, values, width, label=metric, color=_METRIC_COLOURS[metric])
            axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        axes.set_xticks(positions, names)
        axes.set_ylim(0, 1.12)
        axes.set_ylabel("score")
        axes.set_title(f"{split}: accuracy {report['accuracy']:.3f}, n={report['n_samples']}", fontsize=10)
        axes.legend(loc="upper right", fontsize=8, ncols=3)
        axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_dice_boxplot(cases: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Box plot of per-case Dice for the BraTS regions WT, TC and ET, each case drawn as a dot.

    Args:
        cases: per-case ``segmentation_metrics`` dicts (``case["WT"]["dice"]`` etc.).
        path: the PNG file to write.

    Returns:
        ``path``.

    Raises:
        ValueError: ``cases`` is empty.
    """
    if not cases:
        raise ValueError("cases is empty: nothing to plot")
    regions = list(REGIONS)
    values = [[c[r]["dice"] for c in cases if c[r]["dice"] is not None] for r in regions]
    figure = _figure(6, 4.2)
    axes = figure.subplots()
    boxes = axes.boxplot(values, patch_artist=True, widths=0.5, showmeans=True)
    for patch, region in zip(boxes["boxes"], regions):
        patch.set_facecolor(_REGION_COLOURS[region])
        patch.set_alpha(0.45)
    # Seeded jitter: the same report always gives the same picture.
    rng = np.random.default_rng(0)
    for position, region_values in enumerate(values, start=1):
        jitter = rng.uniform(-0.08, 0.08, size=len(region_values))
        axes.scatter(position + jitter, region_values, s=14, color="black", alpha=0.7, zorder=3)
    axes.set_xticks(range(1, len(regions) + 1), [f"{r}\n{REGION_NAMES[r]}" for r in regions])
    axes.set_ylim(-0.03, 1.03)
    axes.set_ylabel("Dice")
    axes.set_title(f"Dice per region ({len(cases)} case{'s' if len(cases) != 1 else ''})", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


__all__ = ["plot_confusion_matrices", "plot_dice_boxplot", "plot_per_class_metrics"]
