"""The CI gate: hold an ablation's cells to thresholds and to a baseline.

    report = run_check(Path("stores/smoke.sqlite"), Path("ablations/thresholds.yaml"),
                       baseline_path=Path("ablations/smoke.baseline.json"))
    for check in report.checks:
        print(check.status, check.cell_id, check.name, check.reason)
    sys.exit(report.exit_code)            # 0 when every check passes, 1 otherwise

A thresholds file is YAML::

    ablation: smoke                       # optional; --ablation takes precedence
    tolerance: {accuracy: 0.01, convergence_rate: 0.10}
    rules:
      - select: all                       # or {}: every cell
        min_convergence_rate: 0.6
      - select: {activation: sigmoid}     # factor -> level (or a list of levels)
        min_median_accuracy: 0.85
        max_collapse_rate: 0.1
      - select: {cell: "activation=relu,width=100"}
        min_convergence_rate: null        # null removes an earlier rule's threshold

For each cell and threshold the last rule that selects the cell and sets the threshold
applies. A threshold applies to the point estimate (median accuracy, convergence rate,
collapse rate), and the report shows its interval beside it. Against a baseline, each
cell's mean accuracy and convergence rate fail only when the whole 95% interval of
``current - baseline`` lies below ``-tolerance``. A drop whose point estimate is
beyond the tolerance but whose interval is not has status NOISE. A cell that the
baseline lacks has status NO-BASELINE. Both statuses pass.

NOTE: with one run per cell the bootstrap interval is the point itself, so any drop
beyond the tolerance fails, and percentile intervals over a handful of runs are
narrower than their nominal 95%. Baselines of 5 or more seeds make the gate noise-aware.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mnistbench.baseline import Baseline, CellRuns, difference, load_baseline, read_cells
from mnistbench.errors import CheckInputError
from mnistbench.matrix import Criteria
from mnistbench.stats import DEFAULT_CONFIDENCE, Estimate, bootstrap_median, wilson
from mnistbench.store import Store
from mnistbench.thresholds import THRESHOLD_KEYS, Rule, Thresholds, load_thresholds, match_rules

logger = logging.getLogger(__name__)

PASS, FAIL, NOISE, NO_BASELINE = "PASS", "FAIL", "NOISE", "NO-BASELINE"
STATUSES = (PASS, FAIL, NOISE, NO_BASELINE)
CONFIDENCE = f"{DEFAULT_CONFIDENCE:.0%}"
UNFINISHED_SHOWN = 5  # cells named in the error about cells without finished runs


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check of one cell."""

    cell_id: str
    levels: Mapping[str, str]  # factor -> level text
    kind: str  # "threshold" or "baseline"
    metric: str  # a threshold key, or "accuracy" / "convergence_rate" against the baseline
    name: str  # what was checked, as in "median accuracy >= 0.850"
    status: str  # one of STATUSES
    reason: str  # a full sentence naming the cell, metric, value, limit and interval
    value: float | None = None  # the estimate; for a baseline check, current - baseline
    lower: float | None = None  # 95% interval of ``value``
    upper: float | None = None
    limit: float | None = None  # the threshold; for a baseline check, -tolerance
    runs: str = ""  # the runs behind the estimate, as in "5" or "5 paired"
    method: str = ""  # the estimator and interval, from stats.Estimate.method
    rule: str | None = None  # key path of the rule that set the threshold
    current: float | None = None  # baseline checks: the current mean
    reference: float | None = None  # baseline checks: the baseline mean


@dataclass(frozen=True)
class CheckReport:
    """All checks of one ``mnistbench check`` call, in cell order."""

    ablation: str
    store: str
    thresholds: str
    baseline: str | None  # path of the baseline, or None when none was given
    checks: tuple[CheckResult, ...]

    def counts(self) -> dict[str, int]:
        """Return the number of checks per status, in the order of STATUSES."""
        return {status: sum(c.status == status for c in self.checks) for status in STATUSES}

    @property
    def passed(self) -> bool:
        return not any(check.status == FAIL for check in self.checks)

    @property
    def exit_code(self) -> int:
        """0 when no check failed, 1 otherwise."""
        return 0 if self.passed else 1


def run_check(store_path: Path, thresholds_path: Path, *, baseline_path: Path | None = None,
              ablation: str | None = None) -> CheckReport:
    """Check an ablation's finished runs against thresholds and an optional baseline.

    Args:
        store_path: the store with the current results.
        thresholds_path: the thresholds YAML file.
        baseline_path: a store or JSON summary to compare against; None gives each
            cell NO-BASELINE baseline checks.
        ablation: the ablation to check; defaults to the thresholds file's ``ablation``
            key, then to the store's only ablation.

    Raises:
        CheckInputError: invalid thresholds or baseline, a selector that matches no
            cell, or a cell without finished runs.
        StoreError: the store is missing, lacks the ablation, or contains duplicated runs.
    """
    thresholds = load_thresholds(thresholds_path)
    if ablation is not None and thresholds.ablation not in (None, ablation):
        logger.info("checking ablation %s given on the command line instead of %s named in %s",
                    ablation, thresholds.ablation, thresholds_path)
    with Store(store_path, readonly=True) as store:
        record = store.ablation(ablation or thresholds.ablation)
        name = record["name"]
        cells, unfinished = read_cells(store, name)
        members = store.member_count(name)
    finished = sum(len(cell) for cell in cells)
    if finished < members:
        logger.warning("ablation %s has %d of %d runs finished; checking the finished ones",
                       name, finished, members)
    if unfinished:
        named = ", ".join(unfinished[:UNFINISHED_SHOWN])
        if len(unfinished) > UNFINISHED_SHOWN:
            named += f" and {len(unfinished) - UNFINISHED_SHOWN} more"
        raise CheckInputError(
            f"store {store_path}: {len(unfinished)} cells of ablation '{name}' have no "
            f"finished runs: {named}; run 'mnistbench ablate' on the matrix "
            f"until it completes, then check again"
        )

    factors = {factor: list(levels) for factor, levels in record["factors"].items()}
    matched = match_rules(thresholds, factors, cells, name)
    criteria = Criteria(**record["criteria"])
    baseline = None
    if baseline_path is not None:
        baseline = load_baseline(baseline_path, name)
        if baseline.dataset is not None and baseline.dataset != record["dataset"]:
            raise CheckInputError(
                f"baseline {baseline_path} was trained on dataset {baseline.dataset!r}, but "
                f"ablation '{name}' in {store_path} on {record['dataset']!r}; compare runs "
                f"of one dataset")
        if not baseline.cells:
            raise CheckInputError(
                f"baseline {baseline_path} has no finished runs, so it would check nothing; "
                f"give a baseline whose ablation has finished runs")
        if not set(baseline.cells) & {cell.cell_id for cell in cells}:
            raise CheckInputError(
                f"baseline {baseline_path} has none of the {len(cells)} cells of ablation "
                f"'{name}', so it would check nothing (its cells start "
                f"{sorted(baseline.cells)[0]}, the ablation's {cells[0].cell_id}; a cell id "
                f"lists the factors in the matrix's order); save a baseline of this ablation "
                f"with 'mnistbench baseline save'")
        _warn_about_mismatch(baseline, name, cells)

    checks: list[CheckResult] = []
    for cell in cells:
        checks.extend(_threshold_checks(cell, thresholds.rules, matched))
        checks.extend(_baseline_checks(cell, baseline, criteria, thresholds))
    if all(check.status == NO_BASELINE for check in checks):
        raise CheckInputError(
            f"{thresholds_path}: nothing to check: no rule sets a threshold for any cell and "
            f"no --baseline was given; add rules or a baseline so the gate can fail")
    return CheckReport(name, str(store_path), str(thresholds_path),
                       None if baseline_path is None else str(baseline_path), tuple(checks))


def _warn_about_mismatch(baseline: Baseline, ablation: str, cells: list[CellRuns]) -> None:
    if baseline.ablation != ablation:
        logger.warning("baseline %s is of ablation %s, not %s; comparing cells with equal ids",
                       baseline.source, baseline.ablation, ablation)
    extra = sorted(set(baseline.cells) - {cell.cell_id for cell in cells})
    if extra:
        logger.warning("baseline %s has %d cells that the checked ablation lacks, not "
                       "checked: %s", baseline.source, len(extra), ", ".join(extra))


def _threshold_checks(cell: CellRuns, rules: tuple[Rule, ...],
                      matched: Mapping[str, frozenset[str]]) -> list[CheckResult]:
    """Apply the last rule that selects the cell and sets each threshold."""
    limits: dict[str, tuple[float | None, Rule]] = {}
    for rule in rules:
        if cell.cell_id in matched[rule.key]:
            for key, value in rule.limits.items():
                limits[key] = (value, rule)
    checks = []
    for key in THRESHOLD_KEYS:
        if key in limits and limits[key][0] is not None:
            limit, rule = limits[key]
            checks.append(_THRESHOLD_CHECKS[key](cell, limit, rule.key))
    return checks


def _check_median_accuracy(cell: CellRuns, limit: float, rule: str) -> CheckResult:
    estimate = bootstrap_median(cell.accuracy)
    total = len(cell)
    name = f"median accuracy >= {limit:.3f}"
    common = dict(cell_id=cell.cell_id, levels=cell.levels, kind="threshold",
                  metric="min_median_accuracy", name=name, limit=limit, rule=rule,
                  method=estimate.method)
    if estimate.n == 0:
        return CheckResult(**common, status=FAIL, runs=f"0 of {total}", reason=(
            f"cell {cell.cell_id}: median accuracy undefined because none of its {total} runs "
            f"has a final accuracy (crashed or diverged); minimum {limit:.3f}"))
    runs = f"{estimate.n}" if estimate.n == total else f"{estimate.n} of {total}"
    passed = estimate.value >= limit
    comparison = ">=" if passed else "<"
    reason = (f"cell {cell.cell_id}: median accuracy {estimate.value:.3f} {comparison} minimum "
              f"{limit:.3f} ({CONFIDENCE} bootstrap interval of the median "
              f"{_interval(estimate)}, {_runs_phrase(estimate.n, total)})")
    return CheckResult(**common, status=PASS if passed else FAIL, reason=reason,
                       runs=runs, **_numbers(estimate))


def _check_rate(cell: CellRuns, limit: float, rule: str, *, key: str) -> CheckResult:
    converged = key == "min_convergence_rate"
    flags = cell.converged if converged else cell.collapsed
    estimate = wilson(sum(flags), len(flags))
    label, verb = ("convergence rate", "converged") if converged else ("collapse rate", "collapsed")
    passed = estimate.value >= limit if converged else estimate.value <= limit
    if converged:
        comparison = ">=" if passed else "<"
        bound = "minimum"
    else:
        comparison = "<=" if passed else ">"
        bound = "maximum"
    reason = (f"cell {cell.cell_id}: {label} {estimate.value:.3f} {comparison} {bound} "
              f"{limit:.3f} ({CONFIDENCE} Wilson interval {_interval(estimate)}, {sum(flags)} "
              f"of {len(flags)} runs {verb})")
    return CheckResult(
        cell_id=cell.cell_id, levels=cell.levels, kind="threshold", metric=key,
        name=f"{label} {'>=' if converged else '<='} {limit:.3f}",
        status=PASS if passed else FAIL, reason=reason, limit=limit, runs=str(len(flags)),
        method=estimate.method, rule=rule, **_numbers(estimate))


_THRESHOLD_CHECKS = {
    "min_median_accuracy": _check_median_accuracy,
    "min_convergence_rate": lambda cell, limit, rule: _check_rate(
        cell, limit, rule, key="min_convergence_rate"),
    "max_collapse_rate": lambda cell, limit, rule: _check_rate(
        cell, limit, rule, key="max_collapse_rate"),
}
assert set(_THRESHOLD_CHECKS) == set(THRESHOLD_KEYS), f"{sorted(_THRESHOLD_CHECKS)}"


def _baseline_checks(cell: CellRuns, baseline: Baseline | None, criteria: Criteria,
                     thresholds: Thresholds) -> list[CheckResult]:
    """Compare the cell's mean accuracy and convergence rate with the baseline's."""
    checks = []
    for metric, label in (("accuracy", "mean accuracy"), ("convergence_rate", "convergence rate")):
        tolerance = getattr(thresholds.tolerance, metric)
        common = dict(cell_id=cell.cell_id, levels=cell.levels, kind="baseline", metric=metric,
                      name=f"{label} vs baseline", limit=-tolerance)
        if baseline is None:
            checks.append(CheckResult(**common, status=NO_BASELINE, reason=(
                f"cell {cell.cell_id}: {label} not compared because no baseline was given")))
            continue
        reference = baseline.cells.get(cell.cell_id)
        if reference is None:
            checks.append(CheckResult(**common, status=NO_BASELINE, reason=(
                f"cell {cell.cell_id}: {label} not compared because the baseline "
                f"{baseline.source} has no finished runs of this cell")))
            continue
        if baseline.criteria != criteria:
            reference = reference.reclassified(criteria)
        checks.append(_compare(cell, reference, metric, label, tolerance, common))
    return checks


def _compare(cell: CellRuns, reference: CellRuns, metric: str, label: str, tolerance: float,
             common: dict) -> CheckResult:
    """Judge one metric of one cell against the baseline (see the module docstring)."""
    column = "accuracy" if metric == "accuracy" else "converged"
    estimate, paired = difference(cell, reference, column)
    current, before = _mean(cell, column), _mean(reference, column)
    means = dict(current=_finite(current), reference=_finite(before))
    prefix = f"cell {cell.cell_id}"
    if math.isnan(before):
        return CheckResult(**common, status=NO_BASELINE, **means, reason=(
            f"{prefix}: {label} not compared because no baseline run of this cell has a final "
            f"accuracy (crashed or diverged)"))
    if math.isnan(current):
        return CheckResult(**common, status=FAIL, **means, reason=(
            f"{prefix}: {label} undefined because none of the {len(cell)} runs has a final "
            f"accuracy (crashed or diverged), against {before:.3f} in the baseline"))

    sizes = f"{_count(cell, column)} vs {_count(reference, column)}"
    runs = f"{estimate.n} paired" if paired else sizes
    interval = f"{CONFIDENCE} bootstrap interval of the difference {_interval(estimate)}"
    pairing = f"{estimate.n} paired seeds" if paired else f"unpaired, {sizes} runs"
    change = (f"{label} dropped by {-estimate.value:.3f} against the baseline "
              f"({before:.3f} -> {current:.3f})")
    if estimate.upper < -tolerance:
        status = FAIL
        reason = (f"{prefix}: {change}, beyond the tolerance {tolerance:.3f} "
                  f"({interval}, {pairing})")
    elif estimate.value < -tolerance:
        status = NOISE
        reason = (f"{prefix}: {change}, more than the tolerance {tolerance:.3f}, but within "
                  f"noise: the {interval} does not lie wholly below -{tolerance:.3f} ({pairing})")
    else:
        status = PASS
        reason = (f"{prefix}: {label} changed by {estimate.value:+.3f} against the baseline "
                  f"({before:.3f} -> {current:.3f}), within the tolerance {tolerance:.3f} "
                  f"({interval}, {pairing})")
    return CheckResult(**common, status=status, reason=reason, runs=runs,
                       method=estimate.method, **means, **_numbers(estimate))


def _finite_values(cell: CellRuns, column: str) -> list[float]:
    values = cell.accuracy if column == "accuracy" else [float(f) for f in cell.converged]
    return [v for v in values if not math.isnan(v)]


def _mean(cell: CellRuns, column: str) -> float:
    finite = _finite_values(cell, column)
    return sum(finite) / len(finite) if finite else math.nan


def _count(cell: CellRuns, column: str) -> int:
    return len(_finite_values(cell, column))


def _numbers(estimate: Estimate) -> dict[str, float | None]:
    return {"value": _finite(estimate.value), "lower": _finite(estimate.lower),
            "upper": _finite(estimate.upper)}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _interval(estimate: Estimate) -> str:
    return f"[{estimate.lower:.3f}, {estimate.upper:.3f}]"


def _runs_phrase(n: int, total: int) -> str:
    if n == total:
        return f"{n} runs"
    return f"{n} of {total} runs with a final accuracy"
