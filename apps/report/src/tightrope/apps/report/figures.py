"""PNG figures, drawn with matplotlib's non-interactive Agg canvas (no pyplot, no display):
training curves per setting, the clean-vs-certified trade-off, and histograms of the arrays
that experiment scripts save.

Each function writes one file and returns nothing; the markdown links the files by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from tightrope.apps.report.rows import Row, label_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from numpy.typing import NDArray

__all__ = ["CURVES", "draw_curves", "draw_histogram", "draw_tradeoff", "legend_names"]

#: The panels of the training curves: (``metrics.csv`` column, title, is an accuracy).
CURVES = (
    ("val/clean_accuracy", "clean accuracy (validation)", True),
    ("val/pgd_accuracy", "PGD accuracy (validation)", True),
    ("val/verified_accuracy", "verified accuracy (validation, IBP/CROWN-IBP)", True),
    ("train/loss", "training loss", False),
)

#: PNG metadata: no matplotlib version, so an upgrade alone does not change the files.
_METADATA: dict[str, str | None] = {"Software": None}


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=110, metadata=_METADATA)


def legend_names(rows: Sequence[Row]) -> list[str]:
    """One distinct name per row: the method, its label value when it has one, and a number
    when that is still ambiguous."""
    names = [row.run.method + ("" if row.label is None else f" ({label_text(row.label)})")
             for row in rows]
    seen: dict[str, int] = {}
    distinct = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        repeated = names.count(name) > 1
        distinct.append(f"{name} #{seen[name]}" if repeated else name)
    return distinct


def draw_curves(rows: Sequence[Row], title: str, path: Path) -> None:
    """Clean, PGD and verified validation accuracy (%) and training loss per epoch, one line
    per run (rows of the same run are drawn once)."""
    unique: list[Row] = []
    for row in rows:
        if all(other.run.path != row.run.path for other in unique):
            unique.append(row)
    names = legend_names(unique)
    figure = Figure(figsize=(10, 7), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (column, panel, accuracy) in zip(axes, CURVES, strict=True):
        for row, name in zip(unique, names, strict=True):
            epochs = [e.get("epoch", math.nan) for e in row.run.epochs]
            values = [e.get(column, math.nan) * (100 if accuracy else 1) for e in row.run.epochs]
            ax.plot(epochs, values, marker="o", markersize=3, label=name)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel("%" if accuracy else "loss")
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    figure.suptitle(f"training curves: {title}")
    _save(figure, path)


def draw_tradeoff(rows: Sequence[Row], title: str, path: Path, *, references: Sequence[str],
                  label_key: str | None) -> None:
    """Clean vs certified accuracy (%), one point per row: runs of the ``references`` methods
    as black squares named by method, the others coloured by method and named by their label
    value (lines join a method's points in label order). A hollow marker uses the training-time
    verified accuracy because the run has no tightrope-certify result."""
    figure = Figure(figsize=(7, 5.5), layout="constrained")
    ax = figure.add_subplot()
    methods = sorted({row.run.method for row in rows if row.run.method not in references})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    hollow = False
    swept: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        certified = row.certified if row.certified is not None else row.train_verified
        if row.clean is None or certified is None:
            continue
        x, y = 100 * certified, 100 * row.clean
        filled = row.certified is not None
        hollow |= not filled
        if row.run.method in references:
            colour, marker, text = "black", "s", row.run.method
        else:
            colour, marker = colours[row.run.method], "o"
            text = row.run.method if row.label is None else label_text(row.label)
            if isinstance(row.label, (int, float)) and not isinstance(row.label, bool):
                swept.setdefault(row.run.method, []).append((float(row.label), x, y))
        ax.scatter([x], [y], s=45, marker=marker, edgecolors=colour,
                   facecolors=colour if filled else "none", zorder=3)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for method, points in sorted(swept.items()):
        points.sort()
        if len(points) > 1:
            ax.plot([p[1] for p in points], [p[2] for p in points], color=colours[method],
                    linewidth=1, alpha=0.6, zorder=2)
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[m], label=m)
               for m in methods]
    handles += [Line2D([], [], marker="s", linestyle="", color="black",
                       label=f"reference ({m})") for m in sorted(references)
                if any(row.run.method == m for row in rows)]
    if hollow:
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none",
                              color="grey", label="hollow: training-time verified"))
    if handles:
        ax.legend(handles=handles, fontsize=8)
    ax.margins(0.12)
    ax.set_xlabel("certified accuracy (%)")
    ax.set_ylabel("clean accuracy (%)")
    ax.grid(alpha=0.3)
    some_labelled = any(r.label is not None and r.run.method not in references for r in rows)
    labelled = f"; points labelled by {label_key}" if label_key and some_labelled else ""
    ax.set_title(f"clean vs certified: {title}{labelled}", fontsize=10)
    _save(figure, path)


def draw_histogram(arrays: Mapping[str, NDArray[np.float64]], title: str, path: Path, *,
                   bins: int) -> None:
    """One step histogram per array on shared axes and shared bins (finite values only), with
    a dashed line at 0 when 0 lies inside the range (estimate minus exact: 0 is exact)."""
    finite = {key: values[np.isfinite(values)] for key, values in arrays.items()}
    pooled = np.concatenate([v for v in finite.values() if v.size] or [np.zeros(1)])
    edges = np.histogram_bin_edges(pooled, bins=bins)
    figure = Figure(figsize=(8, 5), layout="constrained")
    ax: Axes = figure.add_subplot()
    for key, values in finite.items():
        if values.size:
            ax.hist(values, bins=edges.tolist(), histtype="step", linewidth=1.5,
                    label=f"{key} (n={values.size})")
    if edges[0] <= 0 <= edges[-1]:
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(figure, path)
