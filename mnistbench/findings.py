"""Plain-language findings and the verdicts on known claims about this model family.

    analysis = analyze(store)
    for finding in write_findings(analysis):
        print(finding.text)
    for result in evaluate_claims(analysis):
        print(result.claim.statement, result.verdict, result.detail)

A finding calls an effect real only when its 95% interval excludes 0. Otherwise it
reads "no clear difference". Findings are ranked with clear effects first, then by the
size of the effect in points. The claims are data (:data:`CLAIMS`). Each names the runs
it compares and the rule that turns an interval into a verdict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mnistbench.analysis import (
    Analysis,
    format_points,
    format_rate,
    is_clear,
    metric_values,
    pair_runs,
)
from mnistbench.matrix import format_level
from mnistbench.stats import Estimate, bootstrap_median, paired_difference, wilson

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
NOT_TESTED = "not tested by this matrix"
CLAIMS_TITLE = "Claims from the original hand-tuned experiments"
CLAIMS_NOTE = (
    "mnistbench grew out of hand-tuned experiments with this model family (a flattened "
    "image, an optional Conv1d(1,1,3) front, max-pooling, dropout, plain SGD). Their "
    "conclusions are tested here against this ablation's runs, so each verdict holds for "
    "this matrix's training settings; ablations/notebook.yaml reproduces the original setups. "
    "Where a claim's runs span several levels of a factor, its numbers pool those levels and "
    "name them after \"pooled over\"; the cells table shows each level on its own."
)
FINDINGS_NOTE = (
    "Each difference averages over the levels of the other factors. Where two factors "
    "interact, the average can hide opposite effects; the heatmaps and the cells table "
    "show them cell by cell."
)

# Names of levels that read better as words than as factor=level.
LEVEL_NAMES = {("pool", "true"): "max-pooling", ("conv", "true"): "the Conv1d(1,1,3) front"}
# Factors whose level text names itself ("relu runs"); others read as "pool=true runs".
SELF_NAMED_FACTORS = frozenset({"activation", "init", "loss", "optimizer", "precision"})
RATE_VERBS = {"converged": "converge", "collapsed": "collapse to one class",
              "diverged": "diverge"}
RATE_COLUMNS = {"converged": "convergence_rate", "collapsed": "collapse_rate",
                "diverged": "divergence_rate"}


def describe_sample(row: dict) -> str:
    """Describe the runs behind a difference: "40 paired runs" or "12 and 10 unpaired runs".

    The counts are those the estimate uses. Pairs or runs left out because a run has no
    final accuracy (it diverged or crashed) are counted after a semicolon.
    """
    dropped = row["dropped"]
    if row["paired"]:
        text = f"{row['estimate'].n} paired runs"
        if dropped == 1:
            text += "; 1 pair left out because a run in it has no final accuracy"
        elif dropped:
            text += f"; {dropped} pairs left out because a run in each has no final accuracy"
        return text
    text = f"{row['treatment_used']} and {row['control_used']} unpaired runs"
    if dropped == 1:
        text += "; 1 run without a final accuracy left out"
    elif dropped:
        text += f"; {dropped} runs without a final accuracy left out"
    return text


def level_label(factor: str, level: str) -> str:
    """Return how a finding names the runs of one level: "relu" or "pool=true"."""
    return level if factor in SELF_NAMED_FACTORS else f"{factor}={level}"


@dataclass(frozen=True)
class Finding:
    """One plain sentence about a difference between two levels of a factor."""

    text: str
    factor: str
    metric: str  # accuracy | converged | collapsed
    estimate: Estimate  # treatment - control, in points
    clear: bool  # the interval excludes 0
    sample: str  # "40 paired runs"


def _accuracy_sentence(row: dict) -> str:
    factor, treatment, control = row["factor"], row["treatment"], row["control"]
    estimate: Estimate = row["estimate"]
    pair = f"{factor}={treatment} vs {factor}={control}"
    name = LEVEL_NAMES.get((factor, treatment))
    subject = f"{name} ({pair})" if name else pair
    if not is_clear(estimate):
        return (f"{subject}: no clear difference in final accuracy "
                f"({format_points(estimate)} over {describe_sample(row)}).")
    verb = "raises" if estimate.value > 0 else "lowers"
    low, high = sorted((abs(estimate.lower), abs(estimate.upper)))
    return (f"{subject} {verb} final accuracy by {abs(estimate.value):.1f} points "
            f"[{low:.1f}, {high:.1f}] over {describe_sample(row)}.")


def _rate_sentence(row: dict, levels: pd.DataFrame) -> str:
    factor, metric = row["factor"], row["metric"]
    estimate: Estimate = row["estimate"]
    rates = {}
    for level in (row["treatment"], row["control"]):
        match = levels[(levels["factor"] == factor) & (levels["level"] == level)]
        rates[level] = match.iloc[0][RATE_COLUMNS[metric]]
    first, second = row["treatment"], row["control"]
    if estimate.value < 0:
        # Name the level with the higher rate first, so the difference reads as positive.
        first, second = second, first
        estimate = Estimate(-estimate.value, -estimate.upper, -estimate.lower, estimate.n,
                            estimate.method)
    kind = "paired" if row["paired"] else "unpaired"
    preposition = "over" if row["paired"] else "between"
    return (f"{level_label(factor, first)} runs {RATE_VERBS[metric]} in "
            f"{format_rate(rates[first])} of runs vs {format_rate(rates[second])} for "
            f"{level_label(factor, second)}; {kind} difference {format_points(estimate, 0)} "
            f"{preposition} {describe_sample(row)}.")


def write_findings(analysis: Analysis) -> list[Finding]:
    """Turn the level differences into ranked sentences.

    Every accuracy comparison gets a sentence. A convergence or collapse comparison gets
    one only when its interval excludes 0, so that a factor with no effect reads as one
    "no clear difference" line. Comparisons without observations are skipped.
    """
    findings = []
    for row in analysis.differences.to_dict("records"):
        estimate: Estimate = row["estimate"]
        if estimate.n == 0:
            continue
        clear = is_clear(estimate)
        if row["metric"] == "accuracy":
            text = _accuracy_sentence(row)
        elif clear:
            text = _rate_sentence(row, analysis.levels)
        else:
            continue
        findings.append(Finding(text=text, factor=row["factor"], metric=row["metric"],
                                estimate=estimate, clear=clear, sample=describe_sample(row)))
    findings.sort(key=lambda f: (not f.clear, -abs(f.estimate.value)))
    return findings


def data_notes(analysis: Analysis) -> list[str]:
    """List cells whose runs are missing, or excluded from accuracy by divergence or crashes."""
    notes = []
    for cell in analysis.cells.to_dict("records"):
        if cell["stored"] < cell["expected"]:
            notes.append(f"cell {cell['cell_id']}: {cell['stored']} of {cell['expected']} "
                         f"expected runs are stored.")
        if cell["excluded"]:
            accuracy = (f"its accuracy uses the other {cell['finite']} runs" if cell["finite"]
                        else "it has no accuracy estimate")
            notes.append(
                f"cell {cell['cell_id']}: {cell['excluded']} of {cell['stored']} runs have no "
                f"finite final accuracy ({cell['n_diverged']} diverged, {cell['n_crashed']} "
                f"crashed); {accuracy}, and its rates count all {cell['stored']}.")
    return notes


# -- claims -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """Selects runs by one setting: equal to ``value`` (or in it, for a tuple), or greater
    with ``above=True``."""

    setting: str
    value: Any
    above: bool = False

    def select(self, settings: pd.DataFrame) -> pd.Series:
        column = settings[self.setting]
        if isinstance(self.value, tuple):
            return column.isin(self.value)
        return column > self.value if self.above else column == self.value

    def __str__(self) -> str:
        if isinstance(self.value, tuple):
            return f"{self.setting} in ({', '.join(map(format_level, self.value))})"
        value = format_level(self.value)
        return f"{self.setting} > {value}" if self.above else f"{self.setting}={value}"


@dataclass(frozen=True)
class Paired:
    """Mean paired difference ``treatment - control`` of one metric, in points.

    Runs pair up when they share the seed and every setting except ``setting``.
    """

    setting: str
    treatment: Match
    control: Match
    metric: str  # accuracy | converged | collapsed


@dataclass(frozen=True)
class Pooled:
    """Median final accuracy, in percent, of all runs that match every condition."""

    where: tuple[Match, ...]


@dataclass(frozen=True)
class AboveZero:
    """Supported when the interval lies above 0. Contradicted when it lies below 0, or
    when the treatment runs' own rate has an upper bound under ``rate_floor`` points."""

    rate_floor: float

    def verdict(self, estimate: Estimate, treatment_rate: Estimate | None = None) -> str:
        if estimate.lower > 0:
            return SUPPORTED
        if estimate.upper < 0:
            return CONTRADICTED
        if treatment_rate is not None and treatment_rate.upper * 100 < self.rate_floor:
            return CONTRADICTED
        return INCONCLUSIVE


@dataclass(frozen=True)
class InRange:
    """Supported when the estimate lies in [low, high] (and, with ``exclude_zero``, its
    interval excludes 0). Contradicted when the interval is disjoint from [low, high]."""

    low: float
    high: float
    exclude_zero: bool

    def verdict(self, estimate: Estimate, treatment_rate: Estimate | None = None) -> str:
        inside = self.low <= estimate.value <= self.high
        if inside and (not self.exclude_zero or estimate.excludes(0.0)):
            return SUPPORTED
        if estimate.upper < self.low or estimate.lower > self.high:
            return CONTRADICTED
        return INCONCLUSIVE


@dataclass(frozen=True)
class BelowBound:
    """Supported when the upper bound is below ``bound``; contradicted when the lower is above."""

    bound: float

    def verdict(self, estimate: Estimate, treatment_rate: Estimate | None = None) -> str:
        if estimate.upper < self.bound:
            return SUPPORTED
        if estimate.lower > self.bound:
            return CONTRADICTED
        return INCONCLUSIVE


@dataclass(frozen=True)
class Equivalent:
    """Supported when the interval lies in [-margin, margin]; contradicted when entirely outside."""

    margin: float

    def verdict(self, estimate: Estimate, treatment_rate: Estimate | None = None) -> str:
        if -self.margin <= estimate.lower and estimate.upper <= self.margin:
            return SUPPORTED
        if estimate.lower > self.margin or estimate.upper < -self.margin:
            return CONTRADICTED
        return INCONCLUSIVE


@dataclass(frozen=True)
class Claim:
    """A claim about this model family, the runs that test it and the rule for its verdict."""

    key: str
    statement: str
    subject: Paired | Pooled
    rule: AboveZero | InRange | BelowBound | Equivalent
    rule_text: str  # the rule in words, shown beside the verdict


# The hand-tuned networks used PyTorch's default init or the equal manual uniform one.
_PLAIN = (Match("pool", False), Match("dropout", 0.0), Match("activation", "sigmoid"),
          Match("width", 100), Match("init", ("default", "uniform")))

CLAIMS: tuple[Claim, ...] = (
    Claim("a", "ReLU networks get stuck predicting one class where sigmoid networks do not.",
          Paired("activation", Match("activation", "relu"), Match("activation", "sigmoid"),
                 "collapsed"),
          AboveZero(rate_floor=5.0),
          "supported if the paired collapse difference (relu - sigmoid) lies above 0; "
          "contradicted if it lies below 0 or the relu collapse rate is under 5% at its "
          "upper bound"),
    Claim("b", "Max-pooling costs 6 to 8 points of final accuracy.",
          Paired("pool", Match("pool", True), Match("pool", False), "accuracy"),
          InRange(-8.0, -6.0, exclude_zero=True),
          "supported if the paired difference (pool - no pool) is within [-8, -6] points "
          "and its interval excludes 0; contradicted if the interval is disjoint from "
          "[-8, -6]"),
    Claim("c", "Dropout does not improve final accuracy.",
          Paired("dropout", Match("dropout", 0.0, above=True), Match("dropout", 0.0),
                 "accuracy"),
          BelowBound(1.0),
          "supported if the paired gain of dropout > 0 over dropout 0 is below +1 point at "
          "its upper bound; contradicted if its lower bound is above +1 point"),
    Claim("d", "Hidden widths 80 and 100 reach the same accuracy within 1 point.",
          Paired("width", Match("width", 80), Match("width", 100), "accuracy"),
          Equivalent(1.0),
          "supported if the interval of the paired difference (80 - 100) lies within "
          "[-1, +1] points; contradicted if it lies entirely outside"),
    Claim("e", "The plain 784-100-10 sigmoid MLP reaches about 92% test accuracy.",
          Pooled((Match("conv", False), *_PLAIN)),
          InRange(90.0, 94.0, exclude_zero=False),
          "supported if the median accuracy lies in [90%, 94%]; contradicted if its "
          "interval is disjoint from [90%, 94%]"),
    Claim("f", "The Conv1d(1,1,3) front with sigmoid, width 100, no pooling and no dropout "
               "reaches about 88% test accuracy.",
          Pooled((Match("conv", True), *_PLAIN)),
          InRange(86.0, 90.0, exclude_zero=False),
          "supported if the median accuracy lies in [86%, 90%]; contradicted if its "
          "interval is disjoint from [86%, 90%]"),
)


@dataclass(frozen=True)
class ClaimResult:
    """The verdict on one claim, with the numbers behind it."""

    claim: Claim
    verdict: str  # SUPPORTED | CONTRADICTED | INCONCLUSIVE | NOT_TESTED
    estimate: Estimate | None
    detail: str  # the numbers, or why the matrix cannot test the claim
    # Factors whose levels the estimate pools, each with the levels found among its runs
    # in declared order.
    pooled_over: tuple[tuple[str, tuple[str, ...]], ...] = ()


def varying_factors(runs: pd.DataFrame, factors: Mapping[str, list[str]]
                    ) -> list[tuple[str, tuple[str, ...]]]:
    """Return each factor with more than one level among ``runs``, and those levels."""
    varying = []
    for factor, declared in factors.items():
        levels = _in_declared_order(set(runs[factor]), declared)
        if len(levels) > 1:
            varying.append((factor, levels))
    return varying


def _in_declared_order(levels: set[str], declared: list[str]) -> tuple[str, ...]:
    """Order level texts as declared, with any undeclared ones last."""
    return tuple([level for level in declared if level in levels]
                 + sorted(levels - set(declared)))


def describe_pooled(pooled_over: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    """Describe pooled factors as in "pooled over lr (0.5, 2.0) and width (80, 100)"."""
    parts = [f"{factor} ({', '.join(levels)})" for factor, levels in pooled_over]
    if len(parts) > 1:
        parts = [", ".join(parts[:-1]), parts[-1]]
    return "pooled over " + " and ".join(parts)


def runs_with_settings(analysis: Analysis) -> pd.DataFrame:
    """Return the runs frame joined with each run's typed settings (setting columns added)."""
    settings = analysis.settings.rename(columns=lambda c: c if c == "cell_id" else f"s.{c}")
    return analysis.runs.merge(settings, on="cell_id", how="left")


def _settings_view(runs: pd.DataFrame) -> pd.DataFrame:
    columns = [c for c in runs.columns if c.startswith("s.")]
    return runs[columns].rename(columns=lambda c: c[2:])


def _evaluate_paired(claim: Claim, subject: Paired, runs: pd.DataFrame,
                     factors: Mapping[str, list[str]]) -> ClaimResult:
    settings = _settings_view(runs)
    treatment = runs[subject.treatment.select(settings)]
    control = runs[subject.control.select(settings)]
    if treatment.empty or control.empty:
        missing = subject.treatment if treatment.empty else subject.control
        return ClaimResult(claim, NOT_TESTED, None, f"no stored run has {missing}")

    # Two runs pair up when the seed and every other setting agree.
    others = [c for c in settings.columns if c != subject.setting]
    key = settings[others].apply(lambda row: json.dumps(row.tolist(), default=str), axis=1)
    frame = runs.assign(_key=key, _value=metric_values(runs, subject.metric))
    columns = ["_key", "seed", "_value", "run_key"]
    pairs = pair_runs(frame.loc[treatment.index, columns], frame.loc[control.index, columns],
                      ["_key", "seed"])
    if pairs.empty:
        return ClaimResult(claim, NOT_TESTED, None,
                           f"no two runs with the same seed differ only in {subject.setting}")
    estimate = paired_difference(pairs["_value_t"].to_numpy(), pairs["_value_c"].to_numpy())
    if estimate.n == 0:
        return ClaimResult(claim, INCONCLUSIVE, None,
                           f"none of the {len(pairs)} pairs of runs differing only in "
                           f"{subject.setting} has a finite accuracy on both sides")

    used = pairs[np.isfinite(pairs["_value_t"]) & np.isfinite(pairs["_value_c"])]
    pooled_over = _pooled_in_pairs(runs, used, factors)
    unit = "accuracy" if subject.metric == "accuracy" else f"{subject.metric} rate"
    detail = (f"paired difference in {unit} ({subject.treatment} minus {subject.control}): "
              f"{format_points(estimate)} over {estimate.n} paired runs")
    if pooled_over:
        detail += f", {describe_pooled(pooled_over)}"
    rate = None
    if subject.metric != "accuracy":
        # The rate of the treatment runs that entered a pair, each counted once.
        paired_treatment = pairs.drop_duplicates("run_key_t")
        rate = wilson(int((paired_treatment["_value_t"] > 0).sum()), len(paired_treatment))
        detail += f"; {subject.treatment} {subject.metric} rate {format_rate(rate)}"
    if len(pairs) > estimate.n:
        detail += f"; {len(pairs) - estimate.n} pairs without a finite accuracy left out"
    return ClaimResult(claim, claim.rule.verdict(estimate, rate), estimate,
                       detail + f" ({estimate.method})", pooled_over)


def _pooled_in_pairs(runs: pd.DataFrame, pairs: pd.DataFrame,
                     factors: Mapping[str, list[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Return the factors whose level varies within the treatment or the control runs of pairs.

    The mean of the paired differences pools every level of such a factor. A factor whose
    level only separates treatment from control is not pooled.
    """
    pooled: dict[str, set[str]] = {}
    for side in ("run_key_t", "run_key_c"):
        side_runs = runs[runs["run_key"].isin(pairs[side])]
        for factor, levels in varying_factors(side_runs, factors):
            pooled.setdefault(factor, set()).update(levels)
    return tuple((factor, _in_declared_order(pooled[factor], declared))
                 for factor, declared in factors.items() if factor in pooled)


def _evaluate_pooled(claim: Claim, subject: Pooled, runs: pd.DataFrame,
                     factors: Mapping[str, list[str]]) -> ClaimResult:
    settings = _settings_view(runs)
    selected = np.ones(len(runs), dtype=bool)
    for match in subject.where:
        selected &= match.select(settings).to_numpy()
    conditions = ", ".join(str(match) for match in subject.where)
    chosen = runs[selected]
    if chosen.empty:
        return ClaimResult(claim, NOT_TESTED, None, f"no stored run has {conditions}")
    accuracy = chosen.loc[chosen["finite"], "final_accuracy"].to_numpy(dtype=float) * 100
    estimate = bootstrap_median(accuracy)
    if estimate.n == 0:
        return ClaimResult(claim, INCONCLUSIVE, None,
                           f"none of the {len(chosen)} runs with {conditions} has a finite "
                           f"accuracy")
    pooled_over = tuple(varying_factors(chosen[chosen["finite"]], factors))
    detail = (f"median accuracy {estimate.value:.1f}% [{estimate.lower:.1f}%, "
              f"{estimate.upper:.1f}%] over {estimate.n} runs with {conditions}")
    if pooled_over:
        detail += f", {describe_pooled(pooled_over)}"
    if len(chosen) > estimate.n:
        detail += f"; {len(chosen) - estimate.n} runs without a finite accuracy left out"
    return ClaimResult(claim, claim.rule.verdict(estimate), estimate,
                       detail + f" ({estimate.method})", pooled_over)


def evaluate_claim(claim: Claim, runs: pd.DataFrame,
                   factors: Mapping[str, list[str]]) -> ClaimResult:
    """Test one claim against runs joined with their settings (see :func:`runs_with_settings`).

    ``factors`` maps each factor of the ablation to its level texts in declared order.
    """
    settings = _settings_view(runs)
    needed = ([claim.subject.setting] if isinstance(claim.subject, Paired)
              else [match.setting for match in claim.subject.where])
    absent = [name for name in needed if name not in settings.columns]
    if absent:
        return ClaimResult(claim, NOT_TESTED, None,
                           f"the store has no setting {', '.join(absent)}")
    if isinstance(claim.subject, Paired):
        return _evaluate_paired(claim, claim.subject, runs, factors)
    return _evaluate_pooled(claim, claim.subject, runs, factors)


def evaluate_claims(analysis: Analysis, claims: tuple[Claim, ...] = CLAIMS) -> list[ClaimResult]:
    """Test each claim against the ablation's runs, in the order given."""
    runs = runs_with_settings(analysis)
    return [evaluate_claim(claim, runs, analysis.factors) for claim in claims]
