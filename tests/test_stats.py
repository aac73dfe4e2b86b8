"""Interval estimates checked against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mnistbench.stats import (
    bootstrap_iqm,
    bootstrap_mean,
    bootstrap_median,
    iqm,
    paired_difference,
    unpaired_difference,
    wilson,
)


@pytest.mark.parametrize("successes, n, lower, upper", [
    # Wilson score interval, z = 1.959964; values from the closed form by hand.
    pytest.param(0, 10, 0.0, 0.27753, id="none-of-10"),
    pytest.param(5, 10, 0.23659, 0.76341, id="half-of-10"),
    pytest.param(10, 10, 0.72247, 1.0, id="all-of-10"),
    pytest.param(1, 40, 0.00443, 0.12883, id="one-of-40"),
])
def test_wilson_interval_matches_closed_form(successes: int, n: int, lower: float,
                                             upper: float) -> None:
    estimate = wilson(successes, n)
    assert estimate.value == pytest.approx(successes / n)
    assert estimate.lower == pytest.approx(lower, abs=1e-4)
    assert estimate.upper == pytest.approx(upper, abs=1e-4)
    assert estimate.n == n
    assert "Wilson" in estimate.method


def test_wilson_without_observations_is_nan() -> None:
    estimate = wilson(0, 0)
    assert np.isnan(estimate.value)
    assert estimate.n == 0


def test_wilson_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match=r"successes must lie in \[0, n\]; got 11 of 10"):
        wilson(11, 10)


def test_iqm_drops_the_outer_quarters() -> None:
    assert iqm(np.array([1.0, 2, 3, 4, 5, 6, 7, 100])) == pytest.approx(4.5)
    assert iqm(np.array([3.0, 1.0])) == pytest.approx(2.0)


@pytest.mark.parametrize("estimator", [bootstrap_mean, bootstrap_iqm, bootstrap_median])
def test_bootstrap_interval_brackets_estimate(estimator) -> None:
    values = np.random.default_rng(1).normal(0.9, 0.02, size=25)
    estimate = estimator(values)
    assert estimate.lower <= estimate.value <= estimate.upper
    assert estimate.upper - estimate.lower < 0.03
    assert estimate.n == 25


def test_bootstrap_ignores_missing_values_and_is_reproducible() -> None:
    values = [0.9, float("nan"), 0.8, 0.85, 0.95]
    first, second = bootstrap_mean(values), bootstrap_mean(values)
    assert first == second
    assert first.n == 4
    assert first.value == pytest.approx(0.875)


def test_single_value_has_a_point_interval() -> None:
    estimate = bootstrap_mean([0.5])
    assert (estimate.value, estimate.lower, estimate.upper) == (0.5, 0.5, 0.5)


def test_paired_difference_recovers_planted_shift() -> None:
    rng = np.random.default_rng(2)
    control = rng.normal(0.9, 0.05, size=40)
    treatment = control - 0.07 + rng.normal(0, 0.002, size=40)
    estimate = paired_difference(treatment, control)
    assert estimate.value == pytest.approx(-0.07, abs=0.002)
    assert estimate.upper < -0.065
    assert estimate.n == 40
    assert estimate.method.startswith("mean paired difference")


def test_paired_difference_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError, match=r"paired samples differ in shape: \(3,\) and \(2,\)"):
        paired_difference([1, 2, 3], [1, 2])


def test_pairing_gives_tighter_interval_than_unpaired() -> None:
    rng = np.random.default_rng(3)
    control = rng.normal(0.9, 0.05, size=30)
    treatment = control + 0.01 + rng.normal(0, 0.003, size=30)
    paired = paired_difference(treatment, control)
    unpaired = unpaired_difference(treatment, control)
    assert paired.upper - paired.lower < (unpaired.upper - unpaired.lower) / 3
    assert unpaired.lower <= unpaired.value <= unpaired.upper
