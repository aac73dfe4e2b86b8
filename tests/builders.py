"""Hand-built stores for tests of the report and the check: known numbers, no training.

    store = build_store(tmp_path / "s.sqlite", {"name": "t", "seeds": 4,
                        "factors": {"activation": ["relu", "sigmoid"]}},
                        lambda cell, seed: Planned(accuracy=0.9 + 0.01 * seed))
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnistbench.matrix import Cell, parse_matrix
from mnistbench.outcome import EpochRecord, RunResult, outcome_of_counts
from mnistbench.store import Store, run_key

TEST_SET_SIZE = 10_000
# 4 cells x 4 seeds of runs that train in about a second each on real MNIST; with
# --max-stack 2 and one worker they train as 8 stacks one after another, so a kill
# lands between commits.
TINY_MATRIX = """\
name: tiny
seeds: 4
train: {epochs: 1, train_subset: 2000, batch_size: 64, lr: 0.5, width: 32}
factors:
  activation: [sigmoid, relu]
  dropout: [0.0, 0.5]
"""

PROVENANCE = {
    "package_version": "0.1.0",
    "git_commit": "0000000",
    "torch_version": "2.13.0",
    "dataset_md5": "synthetic",
}


@dataclass(frozen=True)
class Planned:
    """What a synthetic run should look like; None for the cell/seed means "not trained"."""

    accuracy: float = 0.95  # final test accuracy
    collapse_class: int | None = None  # predictions concentrated on this class (share 0.95)
    diverged_at: int | None = None  # epoch at which the loss became NaN
    error: str | None = None  # crash text
    epochs: int = 3


def prediction_counts(collapse_class: int | None, share: float = 0.95) -> tuple[int, ...]:
    """Test prediction counts: spread evenly, or ``share`` of them on ``collapse_class``."""
    if collapse_class is None:
        return (1000,) * 10
    top = round(TEST_SET_SIZE * share)
    rest = (TEST_SET_SIZE - top) // 9
    counts = [rest] * 10
    counts[collapse_class] = TEST_SET_SIZE - 9 * rest
    return tuple(counts)


def synthetic_result(cell: Cell, seed: int, key: str, plan: Planned, criteria) -> RunResult:
    """Build a RunResult whose accuracy rises linearly to ``plan.accuracy``."""
    if plan.error is not None:
        return RunResult(run_key=key, seed=seed, settings=cell.settings.to_dict(),
                         outcome="crashed", collapse_class=None, final_accuracy=None,
                         final_train_loss=None, max_class_share=None, error=plan.error,
                         provenance=PROVENANCE)
    last = plan.diverged_at if plan.diverged_at is not None else plan.epochs
    epochs = []
    for epoch in range(last + 1):
        nonfinite = plan.diverged_at is not None and epoch == plan.diverged_at
        accuracy = 0.1 + (plan.accuracy - 0.1) * epoch / plan.epochs
        epochs.append(EpochRecord(
            epoch=epoch, train_loss=None if epoch == 0 else (float("nan") if nonfinite
                                                             else 2.0 / (epoch + 1)),
            test_accuracy=accuracy, prediction_counts=prediction_counts(plan.collapse_class),
            dead_fraction=0.1, saturated_fraction=None, grad_norm=1.0, nonfinite=nonfinite,
            seconds=0.5,
        ))
    final = epochs[-1]
    outcome, collapse_class, share = outcome_of_counts(
        final.prediction_counts, final.test_accuracy, final.nonfinite, criteria)
    confusion = tuple(tuple(int(i == j) * 1000 for j in range(10)) for i in range(10))
    return RunResult(
        run_key=key, seed=seed, settings=cell.settings.to_dict(), outcome=outcome,
        collapse_class=collapse_class,
        final_accuracy=None if final.nonfinite else final.test_accuracy,
        final_train_loss=final.train_loss, max_class_share=share, epochs=tuple(epochs),
        confusion=confusion, train_seconds=1.5, provenance=PROVENANCE,
    )


def build_store(path: Path, matrix_data: dict,
                plan: Callable[[Cell, int], Planned | None]) -> Store:
    """Save the matrix and write one synthetic run per (cell, seed) that ``plan`` returns."""
    matrix = parse_matrix(matrix_data, source=str(path), text=repr(matrix_data))
    keyed = [(cell, seed, run_key(cell.settings.to_dict(), seed, "synthetic", "cpu"))
             for cell, seed in matrix.runs()]
    store = Store(path)
    store.save_ablation(matrix, keyed)
    results = []
    for cell, seed, key in keyed:
        planned = plan(cell, seed)
        if planned is not None:
            results.append(synthetic_result(cell, seed, key, planned, matrix.criteria))
    store.write_results(results)
    return store


def count_runs(store: Path) -> int:
    """Count the finished runs in a store file that another process may be writing."""
    if not store.exists():
        return 0
    connection = sqlite3.connect(store, timeout=30)
    try:
        return connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        connection.close()


def store_contents(store: Path) -> tuple[list[str], set[str], int, int]:
    """Read a store file's run keys (with repeats), member keys, claim and epoch counts."""
    connection = sqlite3.connect(store)
    try:
        keys = [row[0] for row in connection.execute("SELECT run_key FROM runs")]
        members = {row[0] for row in connection.execute("SELECT run_key FROM members")}
        claims = connection.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
        epochs = connection.execute("SELECT COUNT(*) FROM epochs").fetchone()[0]
    finally:
        connection.close()
    return keys, members, claims, epochs
