"""Tests of the analysis and the claims: planted numbers come back, intervals hold, rules work."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from builders import Planned, build_store
from mnistbench.analysis import (
    analyze,
    collapse_onsets,
    describe_collapse_classes,
    epochs_to_reach,
    is_clear,
    metric_values,
    top_class_shares,
)
from mnistbench.errors import StoreError
from mnistbench.findings import (
    CLAIMS,
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_TESTED,
    SUPPORTED,
    AboveZero,
    BelowBound,
    Equivalent,
    InRange,
    data_notes,
    describe_sample,
    evaluate_claims,
    write_findings,
)
from mnistbench.stats import Estimate

SEEDS = 10
POOL_MATRIX = {"name": "pool", "seeds": SEEDS,
               "factors": {"activation": ["relu", "sigmoid"], "pool": [False, True]}}


def noise(cell, seed: int) -> float:
    """Small deterministic accuracy noise that differs between cells and seeds."""
    return 0.004 * math.sin(7.0 * seed + 3.0 * cell.index)


def planted(cell, seed: int) -> Planned:
    """Pool costs 7 points; relu collapses to class 7 in seeds 0-2."""
    if cell.settings.activation == "relu" and seed < 3:
        return Planned(accuracy=0.3, collapse_class=7)
    return Planned(accuracy=0.92 - 0.07 * cell.settings.pool + noise(cell, seed))


@pytest.fixture
def pool_analysis(tmp_path: Path):
    with build_store(tmp_path / "s.sqlite", POOL_MATRIX, planted) as store:
        return analyze(store)


def claim_result(analysis, key: str):
    return next(r for r in evaluate_claims(analysis) if r.claim.key == key)


def all_estimates(analysis):
    for frame in (analysis.cells, analysis.levels, analysis.differences):
        for column in frame.columns:
            for value in frame[column]:
                if isinstance(value, Estimate) and value.n > 0:
                    yield column, value


# -- per-run and per-cell numbers ---------------------------------------------------------


def test_intervals_bracket_estimates(pool_analysis):
    checked = 0
    for column, estimate in all_estimates(pool_analysis):
        assert estimate.lower <= estimate.value <= estimate.upper, (column, estimate)
        assert estimate.method, column
        checked += 1
    assert checked > 40


def test_planted_pool_effect_returns(pool_analysis):
    differences = pool_analysis.differences
    row = differences[(differences["factor"] == "pool")
                      & (differences["metric"] == "accuracy")].iloc[0]
    assert row["treatment"] == "true"
    assert row["control"] == "false"
    assert row["paired"]
    assert row["pairs"] == 2 * SEEDS
    # Collapsed relu runs score 0.3 in both pool levels, so 3 of 20 pairs differ by 0.
    assert row["estimate"].value == pytest.approx(-7.0 * 17 / 20, abs=0.3)
    assert row["estimate"].upper < 0


def test_sigmoid_only_pool_effect_is_seven_points(tmp_path):
    matrix = {"name": "p", "seeds": SEEDS, "factors": {"pool": [False, True]}}
    with build_store(tmp_path / "s.sqlite", matrix, planted) as store:
        analysis = analyze(store)
    row = analysis.differences.query("metric == 'accuracy'").iloc[0]
    assert row["estimate"].value == pytest.approx(-7.0, abs=0.3)
    assert row["estimate"].lower > -8.0
    assert row["estimate"].upper < -6.0


def test_cell_counts_and_rates(pool_analysis):
    cells = pool_analysis.cells.set_index("cell_id")
    relu = cells.loc["activation=relu,pool=false"]
    assert relu["expected"] == SEEDS
    assert relu["stored"] == SEEDS
    assert relu["n_collapsed"] == 3
    assert relu["n_converged"] == 7
    assert relu["collapse_rate"].value == pytest.approx(0.3)
    assert relu["convergence_rate"].value == pytest.approx(0.7)
    assert relu["accuracy_median"].n == SEEDS
    sigmoid = cells.loc["activation=sigmoid,pool=false"]
    assert sigmoid["accuracy_median"].value == pytest.approx(0.92, abs=0.005)
    assert sigmoid["collapse_rate"].upper < 0.35


def test_collapse_class_counts(pool_analysis):
    cells = pool_analysis.cells.set_index("cell_id")
    relu = cells.loc["activation=relu,pool=true"]
    assert relu["collapse_classes"] == {7: 3}
    assert relu["collapse_text"] == f"always predicts 7 (3 of {SEEDS} runs)"
    assert cells.loc["activation=sigmoid,pool=true", "collapse_classes"] == {}


def test_epochs_to_converge_counts_never(pool_analysis):
    cells = pool_analysis.cells.set_index("cell_id")
    # Accuracy rises linearly over 3 epochs: 0.92 first passes 0.90 at epoch 3, 0.85 never.
    unpooled = cells.loc["activation=sigmoid,pool=false"]
    assert unpooled["epochs_to_converge_median"] == 3.0
    assert unpooled["reached_rate"].value == 1.0
    pooled = cells.loc["activation=sigmoid,pool=true"]
    assert math.isinf(pooled["epochs_to_converge_median"])
    assert pooled["reached_rate"].value == 0.0
    relu = cells.loc["activation=relu,pool=false"]
    assert relu["reached_rate"].value == pytest.approx(0.7)
    never = pool_analysis.runs["epochs_to_converge"].apply(math.isinf)
    assert never.sum() == 3 + SEEDS + SEEDS  # collapsed relu runs, then both pooled cells


def test_epochs_to_reach_first_epoch():
    epochs = pd.DataFrame({"run_key": ["a", "a", "a", "b", "b"],
                           "epoch": [0, 1, 2, 0, 1],
                           "test_accuracy": [0.1, 0.95, 0.85, 0.1, 0.5]})
    reached = epochs_to_reach(epochs, 0.9)
    assert reached.to_dict() == {"a": 1.0}


def test_collapse_onset_after_last_dip():
    shares = [[0.95, 0.5, 0.92, 0.97], [0.95, 0.95, 0.95, 0.3], [0.99, 0.99, 0.99, 0.99]]
    rows = [{"run_key": key, "epoch": epoch, "top_share": share}
            for key, run in zip("abc", shares) for epoch, share in enumerate(run)]
    onsets = collapse_onsets(pd.DataFrame(rows), 0.9)
    assert onsets.to_dict() == {"a": 2.0, "c": 0.0}


def test_top_class_share_of_counts():
    counts = pd.Series([[910] + [10] * 9, [100] * 10])
    assert top_class_shares(counts).tolist() == pytest.approx([0.91, 0.1])


@pytest.mark.parametrize("classes, runs, text", [
    pytest.param([7, 7, 7, 7], 5, "always predicts 7 (4 of 5 runs)", id="one-class"),
    pytest.param([3, 7, 7], 8, "always predicts 7 (2 of 8 runs) or 3 (1 of 8 runs)",
                 id="two-classes"),
    pytest.param([], 5, "", id="none"),
])
def test_collapse_class_text(classes, runs, text):
    assert describe_collapse_classes(classes, runs) == text


def test_metric_values_rejects_unknown(pool_analysis):
    with pytest.raises(ValueError, match="unknown metric 'loss'; metrics: accuracy"):
        metric_values(pool_analysis.runs, "loss")


def test_missing_and_diverged_cells_reported(tmp_path):
    matrix = {"name": "m", "seeds": 4, "factors": {"width": [80, 100, 120]}}

    def plan(cell, seed):
        if cell.settings.width == 80:
            return None
        if cell.settings.width == 100:
            return Planned(diverged_at=2)
        return Planned(accuracy=0.93)

    with build_store(tmp_path / "s.sqlite", matrix, plan) as store:
        analysis = analyze(store)
    cells = analysis.cells.set_index("cell_id")
    missing = cells.loc["width=80"]
    assert missing["expected"] == 4
    assert missing["stored"] == 0
    assert missing["accuracy_median"].n == 0
    assert math.isnan(missing["convergence_rate"].value)
    diverged = cells.loc["width=100"]
    assert diverged["stored"] == 4
    assert diverged["finite"] == 0
    assert diverged["excluded"] == 4
    assert diverged["divergence_rate"].value == 1.0
    assert diverged["accuracy_mean"].n == 0
    notes = data_notes(analysis)
    assert "cell width=80: 0 of 4 expected runs are stored." in notes
    assert any(note.startswith("cell width=100: 4 of 4 runs have no finite final accuracy "
                               "(4 diverged, 0 crashed)") for note in notes)


def test_unpaired_fallback_without_shared_seeds(tmp_path):
    matrix = {"name": "u", "seeds": 8, "factors": {"pool": [False, True]}}

    def plan(cell, seed):
        if cell.settings.pool != (seed >= 4):
            return None
        return planted(cell, seed)

    with build_store(tmp_path / "s.sqlite", matrix, plan) as store:
        analysis = analyze(store)
    row = analysis.differences.query("metric == 'accuracy'").iloc[0]
    assert not row["paired"]
    assert row["pairs"] == 0
    assert row["treatment_runs"] == 4
    assert row["control_runs"] == 4
    assert row["estimate"].value == pytest.approx(-7.0, abs=0.5)
    assert row["estimate"].method.startswith("difference of means")


def test_unknown_ablation_raises(tmp_path):
    with build_store(tmp_path / "s.sqlite", POOL_MATRIX, planted) as store:
        with pytest.raises(StoreError, match="ablation 'nope' not found in store"):
            analyze(store, "nope")


# -- findings ---------------------------------------------------------------------------


def test_findings_ranked_and_worded(pool_analysis):
    findings = write_findings(pool_analysis)
    clear = [f for f in findings if f.clear]
    assert clear == findings[:len(clear)]
    sizes = [abs(f.estimate.value) for f in clear]
    assert sizes == sorted(sizes, reverse=True)
    texts = [f.text for f in findings]
    assert any(t.startswith("max-pooling (pool=true vs pool=false) lowers final accuracy by ")
               and t.endswith(f"over {2 * SEEDS} paired runs.") for t in texts)
    assert any(t.startswith("relu runs collapse to one class in 30% [") for t in texts)


def test_finding_without_effect_says_no_clear_difference(tmp_path):
    matrix = {"name": "w", "seeds": 6, "factors": {"width": [80, 100]}}
    with build_store(tmp_path / "s.sqlite", matrix,
                     lambda cell, seed: Planned(accuracy=0.92 + noise(cell, seed))) as store:
        analysis = analyze(store)
    (finding,) = write_findings(analysis)
    assert not finding.clear
    assert finding.text.startswith("width=100 vs width=80: no clear difference in final "
                                   "accuracy (")



def test_finding_reports_divergence(tmp_path):
    """A learning rate that diverges is a finding of its own, not a lower collapse rate."""
    matrix = {"name": "d", "seeds": 8, "factors": {"lr": [0.1, 50.0]}}

    def plan(cell, seed):
        if cell.settings.lr == 50.0 and seed < 6:
            return Planned(diverged_at=1)
        return Planned(accuracy=0.92 + noise(cell, seed))

    with build_store(tmp_path / "s.sqlite", matrix, plan) as store:
        analysis = analyze(store)
    row = analysis.differences.query("metric == 'diverged'").iloc[0]
    assert row["estimate"].value == pytest.approx(75.0)
    texts = [f.text for f in write_findings(analysis) if f.metric == "diverged"]
    assert len(texts) == 1
    assert texts[0].startswith("lr=50.0 runs diverge in 75% [")


def test_divergence_compared_only_where_runs_diverged(pool_analysis):
    metrics = set(pool_analysis.differences["metric"])
    assert metrics == {"accuracy", "converged", "collapsed"}

def diverged_pair_plan(cell, seed: int) -> Planned:
    """Width 100 seed 0 diverges, so 1 of the 4 width pairs has no accuracy on one side."""
    if cell.settings.width == 100 and seed == 0:
        return Planned(diverged_at=2)
    return Planned(accuracy=0.92 + noise(cell, seed))


def test_finding_counts_pairs_used(tmp_path):
    matrix = {"name": "w", "seeds": 4, "factors": {"width": [80, 100]}}
    with build_store(tmp_path / "s.sqlite", matrix, diverged_pair_plan) as store:
        analysis = analyze(store)
    row = analysis.differences.query("metric == 'accuracy'").iloc[0]
    assert row["pairs"] == 4
    assert row["estimate"].n == 3
    assert row["dropped"] == 1
    finding = next(f for f in write_findings(analysis) if f.metric == "accuracy")
    assert finding.sample == ("3 paired runs; 1 pair left out because a run in it has no final "
                              "accuracy")
    assert f"over {finding.sample}" in finding.text
    assert "4 paired runs" not in finding.text


def test_unpaired_finding_counts_runs_used(tmp_path):
    matrix = {"name": "u", "seeds": 8, "factors": {"pool": [False, True]}}

    def plan(cell, seed):
        if cell.settings.pool != (seed >= 4):
            return None
        if seed in (5, 6):
            return Planned(error="out of memory")
        return planted(cell, seed)

    with build_store(tmp_path / "s.sqlite", matrix, plan) as store:
        analysis = analyze(store)
    row = analysis.differences.query("metric == 'accuracy'").iloc[0]
    assert not row["paired"]
    assert row["treatment_runs"] == 4
    assert row["treatment_used"] == 2
    assert row["control_used"] == 4
    assert row["dropped"] == 2
    finding = next(f for f in write_findings(analysis) if f.metric == "accuracy")
    assert finding.sample == "2 and 4 unpaired runs; 2 runs without a final accuracy left out"
    assert f"over {finding.sample}" in finding.text


@pytest.mark.parametrize("paired, dropped, text", [
    pytest.param(True, 0, "3 paired runs", id="paired"),
    pytest.param(True, 2, "3 paired runs; 2 pairs left out because a run in each has no final "
                          "accuracy", id="paired-dropped"),
    pytest.param(False, 0, "3 and 5 unpaired runs", id="unpaired"),
    pytest.param(False, 1, "3 and 5 unpaired runs; 1 run without a final accuracy left out",
                 id="unpaired-dropped"),
])
def test_describe_sample_counts_used(paired: bool, dropped: int, text: str) -> None:
    row = {"paired": paired, "dropped": dropped, "estimate": Estimate(1.0, 0.5, 1.5, 3, "test"),
           "pairs": 3 + dropped, "treatment_used": 3, "control_used": 5, "treatment_runs": 6,
           "control_runs": 6}
    assert describe_sample(row) == text


# -- claims -----------------------------------------------------------------------------


def estimate(value: float, lower: float, upper: float) -> Estimate:
    return Estimate(value, lower, upper, 20, "test")


@pytest.mark.parametrize("rule, interval, rate, verdict", [
    pytest.param(AboveZero(5.0), (30, 10, 50), None, SUPPORTED, id="above-zero"),
    pytest.param(AboveZero(5.0), (-30, -50, -10), None, CONTRADICTED, id="below-zero"),
    pytest.param(AboveZero(5.0), (0, -5, 5), estimate(0.0, 0.0, 0.04), CONTRADICTED,
                 id="rare-treatment"),
    pytest.param(AboveZero(5.0), (0, -5, 5), estimate(0.1, 0.02, 0.3), INCONCLUSIVE,
                 id="straddles-zero"),
    pytest.param(InRange(-8, -6, True), (-6.9, -7.6, -6.2), None, SUPPORTED, id="in-range"),
    pytest.param(InRange(-8, -6, True), (-2, -3, -1), None, CONTRADICTED, id="out-of-range"),
    pytest.param(InRange(-8, -6, True), (-5, -6.5, -3.5), None, INCONCLUSIVE,
                 id="range-overlap"),
    pytest.param(InRange(-8, -6, True), (-7, -15, 1), None, INCONCLUSIVE, id="range-zero"),
    pytest.param(BelowBound(1.0), (0.2, -0.4, 0.8), None, SUPPORTED, id="below-bound"),
    pytest.param(BelowBound(1.0), (2.0, 1.5, 2.5), None, CONTRADICTED, id="above-bound"),
    pytest.param(BelowBound(1.0), (0.8, 0.1, 1.5), None, INCONCLUSIVE, id="bound-inside"),
    pytest.param(Equivalent(1.0), (0.1, -0.5, 0.7), None, SUPPORTED, id="equivalent"),
    pytest.param(Equivalent(1.0), (3.0, 2.0, 4.0), None, CONTRADICTED, id="not-equivalent"),
    pytest.param(Equivalent(1.0), (0.5, -0.5, 1.5), None, INCONCLUSIVE, id="margin-crossed"),
])
def test_claim_rule_verdicts(rule, interval, rate, verdict):
    assert rule.verdict(estimate(*interval), rate) == verdict


def test_claims_are_frozen_data():
    assert [claim.key for claim in CLAIMS] == list("abcdef")
    with pytest.raises(AttributeError):
        CLAIMS[0].key = "z"


def test_planted_effects_supported(pool_analysis):
    collapse = claim_result(pool_analysis, "a")
    assert collapse.verdict == SUPPORTED
    assert collapse.estimate.value == pytest.approx(30.0)
    assert "over 20 paired runs" in collapse.detail
    assert claim_result(pool_analysis, "e").verdict == SUPPORTED


def test_sigmoid_pool_claim_supported(tmp_path):
    matrix = {"name": "p", "seeds": SEEDS, "factors": {"pool": [False, True]}}
    with build_store(tmp_path / "s.sqlite", matrix, planted) as store:
        result = claim_result(analyze(store), "b")
    assert result.verdict == SUPPORTED
    assert result.estimate.value == pytest.approx(-7.0, abs=0.3)


def test_noisy_null_is_inconclusive(tmp_path):
    matrix = {"name": "n", "seeds": 4, "factors": {"activation": ["relu", "sigmoid"]}}

    def plan(cell, seed):
        # One collapse on each side, on different seeds: no difference, few runs.
        relu = cell.settings.activation == "relu"
        collapsed = (relu and seed == 0) or (not relu and seed == 1)
        return Planned(accuracy=0.9, collapse_class=3 if collapsed else None)

    with build_store(tmp_path / "s.sqlite", matrix, plan) as store:
        result = claim_result(analyze(store), "a")
    assert result.verdict == INCONCLUSIVE
    assert result.estimate.lower < 0 < result.estimate.upper


def test_small_pool_cost_contradicted(tmp_path):
    matrix = {"name": "c", "seeds": SEEDS, "factors": {"pool": [False, True]}}

    def plan(cell, seed):
        return Planned(accuracy=0.92 - 0.02 * cell.settings.pool + noise(cell, seed))

    with build_store(tmp_path / "s.sqlite", matrix, plan) as store:
        result = claim_result(analyze(store), "b")
    assert result.verdict == CONTRADICTED
    assert result.estimate.upper < -1.0
    assert result.estimate.lower > -3.0


def test_conv_accuracy_claim_contradicted(tmp_path):
    matrix = {"name": "f", "seeds": 5, "factors": {"conv": [False, True]}}

    def plan(cell, seed):
        return Planned(accuracy=(0.80 if cell.settings.conv else 0.92) + noise(cell, seed))

    with build_store(tmp_path / "s.sqlite", matrix, plan) as store:
        analysis = analyze(store)
    conv = claim_result(analysis, "f")
    assert conv.verdict == CONTRADICTED
    assert conv.estimate.value == pytest.approx(80.0, abs=0.5)
    assert claim_result(analysis, "e").verdict == SUPPORTED


def test_absent_factors_not_tested(pool_analysis):
    dropout = claim_result(pool_analysis, "c")
    assert dropout.verdict == NOT_TESTED
    assert dropout.detail == "no stored run has dropout > 0.0"
    assert dropout.estimate is None
    width = claim_result(pool_analysis, "d")
    assert width.verdict == NOT_TESTED
    assert width.detail == "no stored run has width=80"


def test_dropout_without_pairs_not_tested(tmp_path):
    # Dropout and width change together, so no two runs differ only in dropout.
    matrix = {"name": "b", "seeds": 3, "factors": {"setup": {
        "small": {"dropout": 0.0, "width": 80}, "large": {"dropout": 0.5, "width": 100}}}}
    with build_store(tmp_path / "s.sqlite", matrix, lambda c, s: Planned()) as store:
        result = claim_result(analyze(store), "c")
    assert result.verdict == NOT_TESTED
    assert result.detail == "no two runs with the same seed differ only in dropout"


def test_is_clear_needs_finite_interval():
    assert is_clear(estimate(1.0, 0.5, 1.5))
    assert not is_clear(estimate(1.0, -0.5, 1.5))
    assert not is_clear(Estimate(np.nan, np.nan, np.nan, 0, "none"))


def test_pooled_claim_names_varying_factors(tmp_path):
    matrix = {"name": "lr", "seeds": 3, "factors": {"lr": [0.5, 1e6]}}

    def plan(cell, seed):
        return Planned(accuracy=0.92 if cell.settings.lr < 1 else 0.1)

    with build_store(tmp_path / "s.sqlite", matrix, plan) as store:
        result = claim_result(analyze(store), "e")
    assert result.pooled_over == (("lr", ("0.5", "1000000.0")),)
    assert result.detail.startswith(
        "median accuracy 51.0% [10.0%, 92.0%] over 6 runs with conv=false, pool=false, "
        "dropout=0.0, activation=sigmoid, width=100, init in (default, uniform), pooled over "
        "lr (0.5, 1000000.0) (median, ")


def test_pooled_claim_of_one_cell_pools_nothing(pool_analysis):
    result = claim_result(pool_analysis, "e")
    assert result.pooled_over == ()
    assert "pooled over" not in result.detail


def test_paired_claim_names_varying_factors(tmp_path):
    matrix = {"name": "p", "seeds": 3, "factors": {
        "pool": [False, True], "lr": [0.5, 1e6], "dropout": [0.0, 0.25, 0.5]}}
    with build_store(tmp_path / "s.sqlite", matrix, planted) as store:
        analysis = analyze(store)
    pool = claim_result(analysis, "b")
    assert pool.pooled_over == (("lr", ("0.5", "1000000.0")), ("dropout", ("0.0", "0.25", "0.5")))
    assert ("over 18 paired runs, pooled over lr (0.5, 1000000.0) and dropout (0.0, 0.25, 0.5) "
            "(mean paired difference") in pool.detail
    # The treatment runs of the dropout claim mix two dropout levels.
    dropout = claim_result(analysis, "c")
    assert dropout.pooled_over == (("pool", ("false", "true")), ("lr", ("0.5", "1000000.0")),
                                   ("dropout", ("0.25", "0.5")))
    assert ("over 24 paired runs, pooled over pool (false, true), lr (0.5, 1000000.0) and "
            "dropout (0.25, 0.5)") in dropout.detail
