"""Report figures: each function takes tidy frames and an optional axes and returns the axes.

    palette = level_palette(analysis.factors)
    ax = plot_accuracy_by_level(analysis.runs, "activation", analysis.factors["activation"],
                                palette)
    ax.figure.savefig("accuracy.png")

Every level of a factor keeps one colour across all figures (:func:`level_palette`).
Heatmap cells without runs are drawn hatched grey and labelled "no runs", never in the
colour of a 0% rate. Importing this module selects Matplotlib's Agg backend, so no display
is needed.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 90  # enough for text to stay legible; keeps each embedded PNG near 50 kB
JITTER_SEED = 0  # fixed, so that the same store renders the same figures
LABEL_CHARS = 24  # longer level names are cut in tick labels so panels do not overlap
MISSING_COLOUR = "#d9d9d9"
CLASSES = tuple(range(10))


def level_palette(factors: dict[str, list[str]]) -> dict[str, dict[str, tuple]]:
    """Assign each level of each factor a colour, in declared order, from seaborn's "tab10".

    Returns:
        factor -> level -> RGB tuple. Factors with more than 10 levels use "husl".
    """
    palette = {}
    for factor, levels in factors.items():
        name = "tab10" if len(levels) <= 10 else "husl"
        colours = sns.color_palette(name, n_colors=max(len(levels), 1))
        palette[factor] = dict(zip(levels, colours))
    return palette


def short_label(text: str, limit: int = LABEL_CHARS) -> str:
    """Cut a level name to ``limit`` characters, ending a cut one with an ellipsis."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _strip(ax: Axes, positions, values: np.ndarray, colour: tuple, rng: np.random.Generator,
           size: float, label: str | None = None) -> None:
    """Scatter ``values`` at ``positions`` with a horizontal jitter of +-0.2.

    Seaborn's stripplot draws its jitter from NumPy's global generator, which would make
    every rendering differ; a generator seeded with JITTER_SEED keeps the PNGs identical.
    """
    x = np.asarray(positions, dtype=float) + rng.uniform(-0.2, 0.2, size=len(values))
    ax.scatter(x, values, s=size, color=colour, label=label, edgecolors="none", zorder=3)


def _axes(ax: Axes | None, size: tuple[float, float] = (5.0, 3.5)) -> Axes:
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=size)
    return ax


def plot_rate_heatmap(runs: pd.DataFrame, rows: str, columns: str | None,
                      levels: dict[str, list[str]], outcome: str = "converged",
                      ax: Axes | None = None) -> Axes:
    """Draw the rate of one outcome over the levels of one or two factors.

    Runs of all other factors are pooled. Each annotated cell shows the rate in percent
    and its number of runs.

    Args:
        runs: the runs frame (one row per run) with a bool column named ``outcome``.
        rows: the factor on the vertical axis.
        columns: the factor on the horizontal axis, or None for a single column.
        levels: factor -> levels in declared order, so that levels without runs still show.
        outcome: ``converged`` or ``collapsed``.
    """
    ax = _axes(ax)
    row_levels = levels[rows]
    column_levels = levels[columns] if columns else ["all runs"]
    rates = np.full((len(row_levels), len(column_levels)), np.nan)
    labels = np.full(rates.shape, "no runs", dtype=object)
    for i, row_level in enumerate(row_levels):
        for j, column_level in enumerate(column_levels):
            selected = runs[rows] == row_level
            if columns:
                selected &= runs[columns] == column_level
            group = runs.loc[selected, outcome]
            if len(group):
                rates[i, j] = 100.0 * group.mean()
                labels[i, j] = f"{rates[i, j]:.0f}%\nn={len(group)}"

    # The hatched background shows through the cells that the mask leaves empty.
    ax.add_patch(Rectangle((0, 0), len(column_levels), len(row_levels), facecolor=MISSING_COLOUR,
                           hatch="//", edgecolor="#9a9a9a", linewidth=0, zorder=0))
    sns.heatmap(rates, mask=np.isnan(rates), vmin=0, vmax=100, cmap="viridis", annot=labels,
                fmt="", cbar_kws={"label": f"{outcome} runs (%)"}, linewidths=0.5,
                xticklabels=[short_label(level) for level in column_levels],
                yticklabels=[short_label(level) for level in row_levels], ax=ax)
    for (i, j), label in np.ndenumerate(labels):
        if np.isnan(rates[i, j]):
            ax.text(j + 0.5, i + 0.5, label, ha="center", va="center", fontsize=9)
    ax.tick_params(axis="y", rotation=0)
    ax.set_ylabel(rows)
    ax.set_xlabel(columns or "")
    ax.set_title(f"{outcome} rate")
    return ax


def plot_accuracy_by_level(runs: pd.DataFrame, factor: str, levels: list[str],
                           palette: dict[str, dict[str, tuple]], ax: Axes | None = None) -> Axes:
    """Draw final accuracy (percent) per level as a box plot with every run as a dot.

    Runs without a finite accuracy (diverged, crashed) are not drawn; the tick label
    gives their number beside the number drawn.
    """
    ax = _axes(ax)
    finite = runs[runs["finite"]].assign(accuracy=lambda f: f["final_accuracy"] * 100.0)
    colours = {level: palette[factor][level] for level in levels}
    if finite.empty:
        ax.text(0.5, 0.5, "no run has a finite accuracy", ha="center", va="center",
                transform=ax.transAxes)
    else:
        # Matplotlib's own boxplot: seaborn 0.13.2's passes the `vert` argument that
        # Matplotlib 3.11 deprecates, and the test run treats warnings as errors.
        groups = [finite.loc[finite[factor] == level, "accuracy"].to_numpy() for level in levels]
        present = [i for i, group in enumerate(groups) if group.size]
        boxes = ax.boxplot([groups[i] for i in present], positions=present, widths=0.6,
                           showfliers=False, patch_artist=True,
                           medianprops={"color": "#333333"})
        for i, box in zip(present, boxes["boxes"]):
            box.set_facecolor((*colours[levels[i]], 0.45))
        rng = np.random.default_rng(JITTER_SEED)
        for i, group in enumerate(groups):
            _strip(ax, i, group, colours[levels[i]], rng, size=9)
    ticks = []
    for level in levels:
        group = runs[runs[factor] == level]
        drawn = int(group["finite"].sum())
        left_out = len(group) - drawn
        without = f", {left_out} without" if left_out else ""
        ticks.append(f"{short_label(level)}\nn={drawn}{without}")
    ax.set_xticks(range(len(levels)), ticks)
    ax.set_xlim(-0.5, len(levels) - 0.5)
    ax.set_xlabel(factor)
    ax.set_ylabel("final test accuracy (%)")
    return ax


def plot_learning_curves(epochs: pd.DataFrame, factor: str, levels: list[str],
                         palette: dict[str, dict[str, tuple]], ax: Axes | None = None) -> Axes:
    """Draw median test accuracy (percent) per epoch for each level, with an interquartile band.

    Epoch 0 is the evaluation before training. Epochs of diverged runs whose accuracy
    is not finite are left out of the quantiles.
    """
    ax = _axes(ax)
    for level in levels:
        group = epochs[epochs[factor] == level]
        if group.empty:
            continue
        quantiles = (group.groupby("epoch")["test_accuracy"].quantile([0.25, 0.5, 0.75])
                     .unstack() * 100.0)
        colour = palette[factor][level]
        ax.plot(quantiles.index, quantiles[0.5], color=colour, label=short_label(level),
                marker="o", markersize=3)
        ax.fill_between(quantiles.index, quantiles[0.25], quantiles[0.75], color=colour,
                        alpha=0.2, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), median and IQR")
    ax.set_title(factor)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, title=factor, title_fontsize=8)
    return ax


def plot_collapse_anatomy(runs: pd.DataFrame, factor: str | None,
                          palette: dict[str, dict[str, tuple]], ax: Axes | None = None) -> Axes:
    """Draw each collapsed run at its collapse class (x) and onset epoch (y).

    The onset is the epoch from which the run's top class share stays at or above the
    collapse share. Dots are coloured by the level of ``factor`` when one is given.
    """
    ax = _axes(ax)
    collapsed = runs[runs["collapsed"]].dropna(subset=["collapse_class"])
    if collapsed.empty:
        ax.text(0.5, 0.5, "no run collapsed to one class", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return ax
    frame = collapsed.assign(collapse_class=collapsed["collapse_class"].astype(int))
    rng = np.random.default_rng(JITTER_SEED)
    groups = ([(level, frame[frame[factor] == level]) for level in palette[factor]] if factor
              else [("", frame)])
    for level, group in groups:
        if group.empty:
            continue
        colour = palette[factor][level] if factor else sns.color_palette()[0]
        _strip(ax, group["collapse_class"].to_numpy(), group["collapse_onset"].to_numpy(),
               colour, rng, size=25, label=short_label(level) if factor else None)
    ax.set_xticks(range(len(CLASSES)), [str(c) for c in CLASSES])
    ax.set_xlim(-0.5, len(CLASSES) - 0.5)
    if factor:
        ax.legend(title=factor, fontsize=8, title_fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    latest = frame["collapse_onset"].max()
    ax.set_ylim(-0.5, (latest if np.isfinite(latest) and latest > 1 else 1.0) + 0.5)
    ax.set_xlabel("class that the collapsed run predicts")
    ax.set_ylabel("onset epoch")
    ax.set_title(f"{len(frame)} collapsed run{'s' if len(frame) != 1 else ''}")
    return ax


def plot_collapse_confusion(runs: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Draw the confusion matrix (rows true class, columns predicted) summed over collapsed runs."""
    ax = _axes(ax, (4.5, 3.8))
    matrices = [np.asarray(c) for c in runs.loc[runs["collapsed"], "confusion"] if c is not None]
    if not matrices:
        ax.text(0.5, 0.5, "no collapsed run stored a confusion matrix", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return ax
    total = np.sum(matrices, axis=0)
    # Counts under 5% of the largest stay unlabelled, so the collapse column is easy to see.
    labels = np.where(total >= total.max() * 0.05, total.astype(int).astype(str), "")
    sns.heatmap(total, cmap="mako_r", annot=labels, fmt="", cbar_kws={"label": "test images"},
                square=True, ax=ax, annot_kws={"size": 6})
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"summed over {len(matrices)} collapsed run{'s' if len(matrices) != 1 else ''}")
    return ax


def figure_png(figure: Figure) -> bytes:
    """Render a figure to PNG bytes at :data:`DPI` and close it."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(figure)
    return buffer.getvalue()
