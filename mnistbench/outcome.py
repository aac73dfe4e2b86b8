"""Run results and the rule that turns a run's final metrics into its outcome.

    >>> classify(final_accuracy=0.97, max_class_share=0.11, nonfinite=False,
    ...          criteria=Criteria())
    ('converged', None)

Outcomes, checked in this order:

- ``crashed``: training raised an exception; the error text is kept.
- ``diverged``: the loss or a weight became NaN or infinite.
- ``collapsed``: the largest share of final test predictions that fall into one
  class is at or above the collapse share; the class is recorded.
- ``converged``: final test accuracy is at or above the convergence accuracy.
- ``stalled``: anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mnistbench.matrix import Criteria

OUTCOMES = ("converged", "collapsed", "diverged", "stalled", "crashed")


@dataclass(frozen=True)
class EpochRecord:
    """Metrics of one run after one epoch; epoch 0 is the evaluation before training."""

    epoch: int
    train_loss: float | None  # mean loss over the epoch's steps; None for epoch 0
    test_accuracy: float  # fraction of the test set classified correctly
    prediction_counts: tuple[int, ...]  # test predictions per class, 10 entries
    dead_fraction: float | None  # relu/gelu: hidden units never positive on the test set
    saturated_fraction: float | None  # sigmoid/tanh: hidden activations within 0.01 of a bound
    grad_norm: float | None  # mean over the epoch's steps of the run's global gradient norm
    nonfinite: bool  # loss or weights were NaN or infinite at the end of the epoch
    seconds: float  # wall time of the epoch for the whole stack the run trained in


@dataclass(frozen=True)
class RunResult:
    """Everything the store keeps about one finished run."""

    run_key: str
    seed: int
    settings: dict
    outcome: str
    collapse_class: int | None
    final_accuracy: float | None
    final_train_loss: float | None
    max_class_share: float | None
    epochs: tuple[EpochRecord, ...] = ()
    confusion: tuple[tuple[int, ...], ...] | None = None  # (10, 10): rows true class, columns predicted
    error: str | None = None
    train_seconds: float = 0.0  # wall time of the stack divided by its number of runs
    device: str = "cpu"
    provenance: dict = field(default_factory=dict)


def classify(
    *,
    final_accuracy: float | None,
    max_class_share: float | None,
    nonfinite: bool,
    criteria: Criteria,
    error: str | None = None,
) -> tuple[str, int | None]:
    """Return the outcome name, and for ``collapsed`` a placeholder None class.

    The collapsed class itself comes from the prediction counts; see
    :func:`outcome_of_counts`.
    """
    if error is not None:
        return "crashed", None
    if nonfinite or final_accuracy is None or max_class_share is None:
        return "diverged", None
    if max_class_share >= criteria.collapse_share:
        return "collapsed", None
    if final_accuracy >= criteria.convergence_accuracy:
        return "converged", None
    return "stalled", None


def outcome_of_counts(
    prediction_counts: tuple[int, ...] | list[int],
    final_accuracy: float | None,
    nonfinite: bool,
    criteria: Criteria,
) -> tuple[str, int | None, float | None]:
    """Classify a run from its final test prediction counts.

    Returns:
        ``(outcome, collapse_class, max_class_share)``; the class is set only for
        ``collapsed`` and the share is None for a diverged run.
    """
    if nonfinite or final_accuracy is None:
        return "diverged", None, None
    total = sum(prediction_counts)
    if total <= 0:
        raise ValueError(f"prediction counts sum to {total}; expected a positive test set size")
    top_class = max(range(len(prediction_counts)), key=lambda k: prediction_counts[k])
    share = prediction_counts[top_class] / total
    outcome, _ = classify(
        final_accuracy=final_accuracy, max_class_share=share, nonfinite=False, criteria=criteria
    )
    return outcome, (top_class if outcome == "collapsed" else None), share
