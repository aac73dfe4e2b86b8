"""Per-cell, per-level and paired statistics of one ablation, computed from the store alone.

    with Store("stores/default.sqlite", readonly=True) as store:
        analysis = analyze(store, "default")
    analysis.cells[["cell_id", "stored", "convergence_rate"]]   # one row per declared cell
    analysis.differences.query("metric == 'accuracy'")          # paired level differences

Every frame is tidy: ``runs`` has one row per stored run, ``epochs`` one row per run and
epoch. Summary columns hold :class:`~mnistbench.stats.Estimate` objects, so each number
carries its interval, its n and the name of its method. Accuracy estimates use only runs
with a finite final accuracy. Diverged and crashed runs have none: they are counted in
``excluded`` and in the outcome counts, and enter every rate. The ``format_*`` functions
at the end write Estimates the way the report and findings print them.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mnistbench.outcome import OUTCOMES
from mnistbench.stats import (
    Estimate,
    bootstrap_iqm,
    bootstrap_mean,
    bootstrap_median,
    paired_difference,
    unpaired_difference,
    wilson,
)
from mnistbench.store import Store

METRICS = ("accuracy", "converged", "collapsed", "diverged")  # compared between levels
POINTS = 100.0  # accuracy and rate differences are reported in points (percentage points)


@dataclass(frozen=True)
class Analysis:
    """Everything the report shows about one ablation."""

    name: str
    store_path: str
    ablation: dict  # Store.ablation(): text, resolved matrix, criteria, factors
    convergence_accuracy: float  # fraction; a run at or above it converged
    collapse_share: float  # fraction; a top class share at or above it is a collapse
    factors: dict[str, list[str]]  # factor -> level texts in declared order
    settings: pd.DataFrame  # one row per cell: cell_id and one typed column per setting
    runs: pd.DataFrame  # one row per stored run, with derived columns (see analyze_runs)
    epochs: pd.DataFrame  # one row per stored run and epoch, with ``top_share``
    cells: pd.DataFrame  # one row per declared cell (see summarize_cells)
    levels: pd.DataFrame  # one row per factor and level (see summarize_levels)
    differences: pd.DataFrame  # one row per factor, level pair and metric (see compare_levels)

    @property
    def expected_runs(self) -> int:
        return int(self.cells["expected"].sum())


def analyze(store: Store, ablation: str | None = None) -> Analysis:
    """Load one ablation from the store and compute every summary the report needs.

    Args:
        store: an open store.
        ablation: the ablation name; None when the store contains exactly one.

    Raises:
        StoreError: the ablation is not in the store, or ``None`` is ambiguous.
    """
    stored = store.ablation(ablation)
    name = stored["name"]
    criteria = stored["criteria"]
    factors = {factor: list(levels) for factor, levels in stored["factors"].items()}
    convergence_accuracy = float(criteria["convergence_accuracy"])
    collapse_share = float(criteria["collapse_share"])

    cells = store.cells_frame(name)
    expected, settings = _cell_members_and_settings(store, name)
    epochs = store.epochs_frame(name)
    epochs["top_share"] = top_class_shares(epochs["prediction_counts"])
    runs = analyze_runs(store.runs_frame(name), epochs, convergence_accuracy, collapse_share)

    return Analysis(
        name=name,
        store_path=str(store.path),
        ablation=stored,
        convergence_accuracy=convergence_accuracy,
        collapse_share=collapse_share,
        factors=factors,
        settings=settings,
        runs=runs,
        epochs=epochs,
        cells=summarize_cells(runs, cells, expected),
        levels=summarize_levels(runs, factors),
        differences=compare_levels(runs, factors),
    )


def _cell_members_and_settings(store: Store,
                               ablation: str) -> tuple[dict[str, int], pd.DataFrame]:
    """Return the number of member runs of each cell and each cell's typed settings."""
    # NOTE: Store has no reader for these two columns yet, so this reads its tables directly.
    counts = dict(store.connection.execute(
        "SELECT cell_id, COUNT(*) FROM members WHERE ablation = ? GROUP BY cell_id", (ablation,)
    ).fetchall())
    rows = store.connection.execute(
        "SELECT cell_id, settings_json FROM cells WHERE ablation = ? ORDER BY cell_index",
        (ablation,),
    ).fetchall()
    records = [{"cell_id": cell_id, **json.loads(text)} for cell_id, text in rows]
    if not records:
        return counts, pd.DataFrame({"cell_id": pd.Series(dtype=str)})
    return counts, pd.DataFrame.from_records(records)


def top_class_shares(prediction_counts: pd.Series) -> pd.Series:
    """Return, for each list of 10 prediction counts, the largest count over the total."""
    if prediction_counts.empty:
        return pd.Series(dtype=float, index=prediction_counts.index)
    counts = np.asarray(prediction_counts.tolist(), dtype=np.float64)
    totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = counts.max(axis=1) / totals
    return pd.Series(shares, index=prediction_counts.index)


def epochs_to_reach(epochs: pd.DataFrame, accuracy: float) -> pd.Series:
    """Return the first epoch whose test accuracy is at or above ``accuracy``, per run key.

    Runs that never reach it are absent from the result, and callers fill them with inf.
    """
    reached = epochs[epochs["test_accuracy"] >= accuracy]
    return reached.groupby("run_key")["epoch"].min().astype(float)


def collapse_onsets(epochs: pd.DataFrame, share: float) -> pd.Series:
    """Return, per run key, the epoch from which the top class share stays >= ``share``.

    Only runs whose last epoch is at or above the share appear. Epoch 0 is the
    evaluation before training, so an onset of 0 means the run never left the class
    that the untrained network predicted.
    """
    if epochs.empty:
        return pd.Series(dtype=float)
    ordered = epochs.sort_values(["run_key", "epoch"])
    flagged = ordered["top_share"] >= share
    last = ordered.groupby("run_key").tail(1)
    collapsed_keys = last.loc[last["top_share"] >= share, "run_key"]
    below = ordered[~flagged].groupby("run_key")["epoch"].max()
    first = ordered.groupby("run_key")["epoch"].min()
    onsets = {}
    for key in collapsed_keys:
        onsets[key] = float(below[key] + 1) if key in below.index else float(first[key])
    return pd.Series(onsets, dtype=float)


def analyze_runs(runs: pd.DataFrame, epochs: pd.DataFrame, convergence_accuracy: float,
                 collapse_share: float) -> pd.DataFrame:
    """Add derived columns to the runs frame (one row per run).

    Added columns: one bool per outcome (``converged``, ``collapsed``, ``diverged``,
    ``stalled``, ``crashed``), ``finite`` (final accuracy is a number),
    ``epochs_to_converge`` (first epoch at or above the convergence accuracy, inf for
    never) and ``collapse_onset`` (see :func:`collapse_onsets`, NaN for runs that are
    not collapsed).
    """
    runs = runs.copy()
    for outcome in OUTCOMES:
        runs[outcome] = runs["outcome"] == outcome
    runs["finite"] = np.isfinite(runs["final_accuracy"].astype(float))
    reach = epochs_to_reach(epochs, convergence_accuracy)
    runs["epochs_to_converge"] = runs["run_key"].map(reach).astype(float).fillna(math.inf)
    onsets = collapse_onsets(epochs, collapse_share)
    runs["collapse_onset"] = runs["run_key"].map(onsets).astype(float)
    runs.loc[~runs["collapsed"], "collapse_onset"] = math.nan
    return runs


def describe_collapse_classes(classes: list[int], runs: int) -> str:
    """Describe the classes that collapsed runs predict, as in "always predicts 7 (4 of 5 runs)".

    Several classes read "always predicts 3 (2 of 8 runs) or 7 (1 of 8 runs)", most
    frequent first.

    Args:
        classes: the collapse class of each collapsed run.
        runs: the number of stored runs in the group, for the "of N" part.
    """
    if not classes:
        return ""
    counts = Counter(classes).most_common()
    parts = [f"{label} ({count} of {runs} runs)" for label, count in counts]
    return "always predicts " + " or ".join(parts)


def _group_estimates(group: pd.DataFrame) -> dict[str, Any]:
    """Return accuracy estimates and outcome rates of one group of runs."""
    n = len(group)
    accuracy = group.loc[group["finite"], "final_accuracy"].to_numpy(dtype=float)
    reached = int(np.isfinite(group["epochs_to_converge"]).sum())
    classes = [int(c) for c in group.loc[group["collapsed"], "collapse_class"].dropna()]
    row: dict[str, Any] = {
        "stored": n,
        "finite": int(accuracy.size),
        "excluded": n - int(accuracy.size),
        **{f"n_{outcome}": int(group[outcome].sum()) for outcome in OUTCOMES},
        "accuracy_median": bootstrap_median(accuracy),
        "accuracy_iqm": bootstrap_iqm(accuracy),
        "accuracy_mean": bootstrap_mean(accuracy),
        "convergence_rate": wilson(int(group["converged"].sum()), n),
        "collapse_rate": wilson(int(group["collapsed"].sum()), n),
        "divergence_rate": wilson(int(group["diverged"].sum()), n),
        "reached_rate": wilson(reached, n),
        "epochs_to_converge_median": (float(np.median(group["epochs_to_converge"]))
                                      if n else math.nan),
        "collapse_classes": dict(Counter(classes)),
        "collapse_text": describe_collapse_classes(classes, n),
    }
    return row


def summarize_cells(runs: pd.DataFrame, cells: pd.DataFrame,
                    expected: dict[str, int]) -> pd.DataFrame:
    """Return one row per declared cell, with its stored runs summarized.

    Columns: ``cell_index``, ``cell_id``, the factor columns, ``expected`` (member runs),
    ``stored``, ``finite`` (runs with a finite accuracy), ``excluded`` (stored minus
    finite), ``n_<outcome>`` counts, ``accuracy_median`` / ``accuracy_iqm`` /
    ``accuracy_mean`` (Estimates of the final accuracy as a fraction),
    ``convergence_rate`` / ``collapse_rate`` / ``divergence_rate`` / ``reached_rate``
    (Wilson Estimates over stored runs; ``reached`` means the convergence accuracy was
    reached at some epoch), ``epochs_to_converge_median`` (inf when at least half never
    reach it, NaN for a cell without runs), ``collapse_classes`` (class -> count) and
    ``collapse_text``. A cell without stored runs has NaN estimates with n = 0.
    """
    grouped = dict(tuple(runs.groupby("cell_id", sort=False)))
    empty = runs.iloc[0:0]
    records = []
    for cell in cells.to_dict("records"):
        group = grouped.get(cell["cell_id"], empty)
        records.append({**cell, "expected": int(expected.get(cell["cell_id"], 0)),
                        **_group_estimates(group)})
    return pd.DataFrame.from_records(records)


def summarize_levels(runs: pd.DataFrame, factors: dict[str, list[str]]) -> pd.DataFrame:
    """Return one row per factor and level: the marginal summary over all cells of the level.

    Columns: ``factor``, ``level``, then the same statistics as :func:`summarize_cells`
    (without ``expected``).
    """
    records = []
    for factor, levels in factors.items():
        for level in levels:
            group = runs[runs[factor] == level]
            records.append({"factor": factor, "level": level, **_group_estimates(group)})
    return pd.DataFrame.from_records(records)


def metric_values(runs: pd.DataFrame, metric: str) -> pd.Series:
    """Return a run's value of a compared metric, in points.

    ``accuracy`` is the final accuracy in percent (NaN when not finite). ``converged``,
    ``collapsed`` and ``diverged`` are 100 for a run with that outcome and 0 otherwise,
    so their means are rates in percent.
    """
    if metric == "accuracy":
        return runs["final_accuracy"].astype(float) * POINTS
    if metric in ("converged", "collapsed", "diverged"):
        return runs[metric].astype(float) * POINTS
    raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")


def pair_runs(treatment: pd.DataFrame, control: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Join treatment and control runs that agree on every column of ``keys``.

    Returns:
        One row per pair, with the columns of both sides suffixed ``_t`` and ``_c``.
        A control run may pair with several treatment runs, one per treatment cell.
    """
    return treatment.merge(control, on=keys, how="inner", suffixes=("_t", "_c"))


def compare(treatment: pd.DataFrame, control: pd.DataFrame, keys: list[str],
            metric: str) -> dict[str, Any]:
    """Estimate ``treatment - control`` of one metric, paired on ``keys`` when possible.

    Pairs are runs that agree on every key column (the other factors and the seed).
    When no pair exists, both groups are compared unpaired instead. Runs without a
    finite value (accuracy of a diverged or crashed run) are left out of either estimate.

    Returns:
        ``estimate`` (Estimate in points), ``paired`` (bool), ``pairs`` (pairs formed,
        0 when unpaired), ``dropped`` (pairs, or runs when unpaired, left out for lack of
        a finite value), ``treatment_used`` and ``control_used`` (runs of each side that
        the estimate uses).
    """
    columns = [*keys, "run_key", "_value"]
    pairs = pair_runs(treatment.assign(_value=metric_values(treatment, metric))[columns],
                      control.assign(_value=metric_values(control, metric))[columns], keys)
    if len(pairs):
        estimate = paired_difference(pairs["_value_t"].to_numpy(), pairs["_value_c"].to_numpy())
        used = pairs[np.isfinite(pairs["_value_t"]) & np.isfinite(pairs["_value_c"])]
        return {"estimate": estimate, "paired": True, "pairs": len(pairs),
                "dropped": len(pairs) - estimate.n,
                "treatment_used": used["run_key_t"].nunique(),
                "control_used": used["run_key_c"].nunique()}
    treatment_values = metric_values(treatment, metric).to_numpy()
    control_values = metric_values(control, metric).to_numpy()
    treatment_used = int(np.isfinite(treatment_values).sum())
    control_used = int(np.isfinite(control_values).sum())
    estimate = unpaired_difference(treatment_values, control_values)
    return {"estimate": estimate, "paired": False, "pairs": 0,
            "dropped": len(treatment) + len(control) - treatment_used - control_used,
            "treatment_used": treatment_used, "control_used": control_used}


def compare_levels(runs: pd.DataFrame, factors: dict[str, list[str]]) -> pd.DataFrame:
    """Compare every pair of levels of every factor on each metric.

    For levels declared in the order ``a, b`` the difference is ``b - a``: the later
    level is the treatment. Runs pair up when they share the seed and every other
    factor's level, so a pair differs in this factor only.

    Divergence is compared only where some run diverged, because elsewhere every row of
    it would read 0 against 0.

    Returns:
        One row per factor, level pair and metric: ``factor``, ``treatment``,
        ``control``, ``metric`` (see :data:`METRICS`), ``estimate`` (Estimate in points),
        ``paired``, ``pairs``, ``dropped``, ``treatment_used``, ``control_used`` (see
        :func:`compare`), ``treatment_runs``, ``control_runs`` (stored runs of each level).
    """
    records = []
    metrics = [m for m in METRICS if m != "diverged" or bool(runs["diverged"].any())]
    for factor, levels in factors.items():
        keys = [other for other in factors if other != factor] + ["seed"]
        for control_level, treatment_level in itertools.combinations(levels, 2):
            treatment = runs[runs[factor] == treatment_level]
            control = runs[runs[factor] == control_level]
            if treatment.empty or control.empty:
                continue
            for metric in metrics:
                records.append({
                    "factor": factor, "treatment": treatment_level, "control": control_level,
                    "metric": metric, **compare(treatment, control, keys, metric),
                    "treatment_runs": len(treatment), "control_runs": len(control),
                })
    columns = ["factor", "treatment", "control", "metric", "estimate", "paired", "pairs",
               "dropped", "treatment_used", "control_used", "treatment_runs", "control_runs"]
    return pd.DataFrame.from_records(records, columns=columns)


def outcome_counts(runs: pd.DataFrame) -> dict[str, int]:
    """Return the number of runs per outcome, every outcome present."""
    return {outcome: int((runs["outcome"] == outcome).sum()) for outcome in OUTCOMES}


def is_clear(estimate: Estimate) -> bool:
    """Return True when the interval is finite and excludes 0."""
    return bool(np.isfinite(estimate.lower) and np.isfinite(estimate.upper)
                and estimate.excludes(0.0))


def format_number(value: float, decimals: int = 1) -> str:
    """Format a number with fixed decimals, "n/a" for NaN and "never" for inf."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "never"
    return f"{value:.{decimals}f}"


def format_rate(estimate: Estimate) -> str:
    """Format a rate Estimate (a fraction) as "45% [31%, 60%]"."""
    if estimate.n == 0:
        return "n/a (no runs)"
    return (f"{estimate.value * 100:.0f}% [{estimate.lower * 100:.0f}%, "
            f"{estimate.upper * 100:.0f}%]")


def format_accuracy(estimate: Estimate) -> str:
    """Format an accuracy Estimate (a fraction) as "92.3% [91.8%, 92.9%]"."""
    if estimate.n == 0:
        return "n/a (no finite accuracy)"
    return (f"{estimate.value * 100:.1f}% [{estimate.lower * 100:.1f}%, "
            f"{estimate.upper * 100:.1f}%]")


def format_points(estimate: Estimate, decimals: int = 1) -> str:
    """Format a difference in points as "-6.9 points [-7.6, -6.2]".

    A bound that rounds to zero keeps its sign ("-0.0"), so that an interval that
    barely contains 0 does not read as if it excluded it.
    """
    if estimate.n == 0:
        return "n/a (no observations)"
    return (f"{estimate.value:+.{decimals}f} points [{estimate.lower:+.{decimals}f}, "
            f"{estimate.upper:+.{decimals}f}]")
