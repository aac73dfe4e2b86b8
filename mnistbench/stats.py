"""Interval estimates used by the report and the check.

    >>> estimate = bootstrap_mean([0.91, 0.92, 0.95, 0.90])
    >>> estimate.lower <= estimate.value <= estimate.upper
    True
    >>> wilson(8, 10).value
    0.8

Bootstrap intervals are percentile intervals over ``DEFAULT_RESAMPLES`` resamples
drawn from a generator with a fixed seed, so a report is reproducible byte for byte.
Rates use the Wilson score interval, which stays inside [0, 1] and behaves at 0 of n
and n of n where the normal approximation does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000  # percentile intervals settle to about 0.1 point of accuracy here
DEFAULT_CONFIDENCE = 0.95
BOOTSTRAP_SEED = 20240101  # fixed so that reports and checks are reproducible
Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval and the number of observations behind it."""

    value: float
    lower: float
    upper: float
    n: int
    method: str  # e.g. "mean, 95% percentile bootstrap (2000 resamples)"

    def excludes(self, point: float) -> bool:
        """Return True when ``point`` lies outside the closed interval."""
        return point < self.lower or point > self.upper


def iqm(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% of values along ``axis``.

    Uses scipy's convention for trimming: ``floor(0.25 * n)`` values are dropped at
    each end, so for n < 4 it equals the mean.
    """
    sorted_values = np.sort(values, axis=axis)
    n = sorted_values.shape[axis]
    cut = int(math.floor(0.25 * n))
    kept = np.take(sorted_values, np.arange(cut, n - cut), axis=axis)
    return kept.mean(axis=axis)


def _bootstrap(values: Sequence[float], statistic: Callable[[np.ndarray, int], np.ndarray],
               name: str, resamples: int, confidence: float) -> Estimate:
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    n = data.size
    if n == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0, f"{name}, no finite observations")
    value = float(statistic(data[None, :], 1)[0])
    method = (f"{name}, {confidence:.0%} percentile bootstrap ({resamples} resamples)")
    if n == 1:
        return Estimate(value, value, value, 1, method)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    indexes = rng.integers(0, n, size=(resamples, n))
    replicates = statistic(data[indexes], 1)
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(replicates, [alpha, 1.0 - alpha])
    # Percentile intervals of a skewed statistic can miss the estimate by a hair;
    # widen to include it so that lower <= value <= upper always holds.
    return Estimate(value, float(min(lower, value)), float(max(upper, value)), n, method)


def bootstrap_mean(values: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES,
                   confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Mean of the finite values with a percentile bootstrap interval."""
    return _bootstrap(values, lambda a, axis: a.mean(axis=axis), "mean", resamples, confidence)


def bootstrap_iqm(values: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES,
                  confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Interquartile mean of the finite values with a percentile bootstrap interval."""
    return _bootstrap(values, iqm, "interquartile mean", resamples, confidence)


def bootstrap_median(values: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES,
                     confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Median of the finite values with a percentile bootstrap interval."""
    return _bootstrap(values, lambda a, axis: np.median(a, axis=axis), "median", resamples,
                      confidence)


def paired_difference(treatment: Sequence[float], control: Sequence[float], *,
                      resamples: int = DEFAULT_RESAMPLES,
                      confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Mean of ``treatment[i] - control[i]`` with a bootstrap interval over the pairs.

    Pairs where either side is missing (NaN) are dropped; ``n`` counts the pairs used.
    """
    a = np.asarray(treatment, dtype=np.float64)
    b = np.asarray(control, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} and {b.shape}")
    estimate = bootstrap_mean(a - b, resamples=resamples, confidence=confidence)
    return Estimate(estimate.value, estimate.lower, estimate.upper, estimate.n,
                    estimate.method.replace("mean", "mean paired difference", 1))


def unpaired_difference(treatment: Sequence[float], control: Sequence[float], *,
                        resamples: int = DEFAULT_RESAMPLES,
                        confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Difference of means, ``mean(treatment) - mean(control)``, resampling each group.

    ``n`` is the smaller of the two group sizes.
    """
    a = np.asarray(treatment, dtype=np.float64)
    b = np.asarray(control, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    method = (f"difference of means, {confidence:.0%} percentile bootstrap "
              f"({resamples} resamples per group)")
    if a.size == 0 or b.size == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0, method)
    value = float(a.mean() - b.mean())
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    replicates = (a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
                  - b[rng.integers(0, b.size, size=(resamples, b.size))].mean(axis=1))
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(replicates, [alpha, 1.0 - alpha])
    return Estimate(value, float(min(lower, value)), float(max(upper, value)),
                    int(min(a.size, b.size)), method)


def wilson(successes: int, n: int, *, confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Rate ``successes / n`` with the Wilson score interval.

    Returns NaNs with ``n = 0`` when there are no observations.
    """
    if successes < 0 or successes > n:
        raise ValueError(f"successes must lie in [0, n]; got {successes} of {n}")
    method = f"rate, {confidence:.0%} Wilson score interval"
    if n == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0, method)
    z = Z_95 if confidence == DEFAULT_CONFIDENCE else _normal_quantile(0.5 + confidence / 2)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 of n and n of n the bounds equal p in exact arithmetic, but rounding can put
    # them a hair on the wrong side; clamp so that lower <= value <= upper always holds.
    lower = min(max(0.0, centre - half), p)
    upper = max(min(1.0, centre + half), p)
    return Estimate(p, lower, upper, n, method)


def _normal_quantile(q: float) -> float:
    """Standard normal quantile by bisection on erf; accurate to about 1e-12."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            low = mid
        else:
            high = mid
    return (low + high) / 2
