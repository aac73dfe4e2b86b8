"""Per-seed results of an ablation's cells, and the baselines that ``mnistbench check`` uses.

    with Store("stores/smoke.sqlite", readonly=True) as store:
        write_baseline(store, "smoke", Path("ablations/smoke.baseline.json"))
    baseline = load_baseline(Path("ablations/smoke.baseline.json"), "smoke")
    estimate, paired = difference(current, baseline.cells["activation=relu"], "accuracy")

A baseline is either a store or the compact JSON summary that :func:`write_baseline`
writes. The summary keeps, per cell, the cell id, its levels and per-seed columns
(final accuracy, converged and collapsed flags, largest class share), plus the
ablation's criteria and a digest of the runs' provenance. It has no timestamps, so
saving the same store twice gives the same file. Example::

    {"format": "mnistbench-baseline", "version": 1, "ablation": "smoke",
     "dataset": "mnist", "criteria": {"convergence_accuracy": 0.9, "collapse_share": 0.9},
     "provenance": {"digest": "3f2a...", "git_commit": ["abc1234"], ...},
     "cells": [{"cell_id": "activation=relu", "levels": {"activation": "relu"},
                "seeds": [0, 1], "accuracy": [0.951, null], "converged": [true, false],
                "collapsed": [false, false], "max_class_share": [0.112, null]}]}

``null`` marks a run without a final accuracy or class share (crashed or diverged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnistbench.errors import CheckInputError, StoreError
from mnistbench.matrix import Criteria
from mnistbench.outcome import classify
from mnistbench.stats import Estimate, paired_difference, unpaired_difference
from mnistbench.store import PROVENANCE_KEYS, Store

logger = logging.getLogger(__name__)

BASELINE_FORMAT = "mnistbench-baseline"
BASELINE_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"  # first 16 bytes of every SQLite database file
DIGITS = 6  # decimals kept for accuracies and shares; test-set accuracies need 4 or 5
CELL_KEYS = ("cell_id", "levels", "seeds", "accuracy", "converged", "collapsed",
             "max_class_share")


@dataclass(frozen=True)
class CellRuns:
    """The finished runs of one cell as per-seed columns, all of equal length, in seed order."""

    cell_id: str
    levels: Mapping[str, str]  # factor -> level text as stored
    seeds: tuple[int, ...]
    accuracy: tuple[float, ...]  # final test accuracy; NaN for a crashed or diverged run
    converged: tuple[bool, ...]
    collapsed: tuple[bool, ...]
    max_class_share: tuple[float, ...]  # share of the most predicted class; NaN where unknown

    def __len__(self) -> int:
        return len(self.seeds)

    def reclassified(self, criteria: Criteria) -> CellRuns:
        """Return the runs with converged and collapsed flags recomputed under ``criteria``.

        A run without a final accuracy or class share (crashed or diverged) keeps its flags.
        """
        converged, collapsed = [], []
        for accuracy, share, was_converged, was_collapsed in zip(
                self.accuracy, self.max_class_share, self.converged, self.collapsed):
            if math.isnan(accuracy) or math.isnan(share):
                converged.append(was_converged)
                collapsed.append(was_collapsed)
                continue
            outcome, _ = classify(final_accuracy=accuracy, max_class_share=share,
                                  nonfinite=False, criteria=criteria)
            converged.append(outcome == "converged")
            collapsed.append(outcome == "collapsed")
        return CellRuns(self.cell_id, self.levels, self.seeds, self.accuracy, tuple(converged),
                        tuple(collapsed), self.max_class_share)


@dataclass(frozen=True)
class Baseline:
    """Per-seed results that a check compares the current store against."""

    source: str  # path of the store or JSON file, for messages
    ablation: str
    criteria: Criteria  # the criteria that the flags were computed under
    cells: Mapping[str, CellRuns]  # cell id -> runs; only cells with finished runs
    dataset: str | None = None  # the dataset the baseline was trained on, when recorded


def read_cells(store: Store, ablation: str) -> tuple[list[CellRuns], list[str]]:
    """Read an ablation's finished runs per cell, in declared cell order.

    Returns:
        The cells that have at least one finished run, and the ids of those with none.

    Raises:
        StoreError: two finished runs of one cell have the same seed (raised by
            ``Store.runs_frame``).
    """
    cells = store.cells_frame(ablation)
    runs = store.runs_frame(ablation)
    factors = [c for c in cells.columns if c not in ("cell_index", "cell_id")]

    finished, unfinished = [], []
    for row in cells.to_dict("records"):
        group = runs[runs["cell_id"] == row["cell_id"]]
        if group.empty:
            unfinished.append(row["cell_id"])
            continue
        finished.append(CellRuns(
            cell_id=row["cell_id"],
            levels={factor: str(row[factor]) for factor in factors},
            seeds=tuple(int(seed) for seed in group["seed"]),
            accuracy=tuple(_float(value) for value in group["final_accuracy"]),
            converged=tuple(bool(o == "converged") for o in group["outcome"]),
            collapsed=tuple(bool(o == "collapsed") for o in group["outcome"]),
            max_class_share=tuple(_float(value) for value in group["max_class_share"]),
        ))
    return finished, unfinished


def difference(current: CellRuns, baseline: CellRuns, metric: str) -> tuple[Estimate, bool]:
    """Estimate ``current - baseline`` for the mean of ``metric`` in one cell.

    Args:
        metric: ``"accuracy"`` (final test accuracy) or ``"converged"`` (the indicator
            whose mean is the convergence rate).

    Returns:
        The estimate with its 95% bootstrap interval, and whether it pairs runs by seed.
        Runs are paired by seed when both sides have the same seeds and at least one
        pair has a value on both sides. Otherwise each side is resampled on its own.
    """
    ours = _column(current, metric)
    theirs = _column(baseline, metric)
    if current.seeds == baseline.seeds:
        estimate = paired_difference(ours, theirs)
        if estimate.n > 0:
            return estimate, True
    return unpaired_difference(ours, theirs), False


def load_baseline(path: Path, ablation: str) -> Baseline:
    """Read a baseline from a store or a JSON summary.

    Args:
        path: a store file (recognized by the SQLite header) or a JSON summary.
        ablation: the ablation to read from a store. When a store does not contain it
            but contains exactly one ablation, that one is read.

    Raises:
        CheckInputError: the file is missing, unreadable or not a valid summary.
        StoreError: the store is unreadable or contains duplicated runs.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as error:
        raise CheckInputError(f"cannot read baseline {path}: {error.strerror}; give a store "
                              f"or a file written by 'mnistbench baseline save'") from None
    if head == SQLITE_MAGIC:
        return _baseline_from_store(path, ablation)
    return parse_baseline(_read_json(path), str(path))


def baseline_summary(store: Store, ablation: str) -> dict[str, Any]:
    """Build the JSON summary of an ablation's finished runs (see the module docstring)."""
    record = store.ablation(ablation)
    cells, unfinished = read_cells(store, ablation)
    if not cells:
        raise CheckInputError(
            f"ablation '{ablation}' in {store.path} has no finished runs, so its baseline "
            f"would hold nothing to compare against; train it with 'mnistbench ablate' "
            f"first")
    if unfinished:
        logger.warning("baseline of ablation %s leaves out %d cells without finished runs: %s",
                       ablation, len(unfinished), ", ".join(unfinished))
    runs = store.runs_frame(ablation)
    provenance: dict[str, Any] = {key: sorted(set(runs[key])) for key in PROVENANCE_KEYS}
    text = json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    provenance = {"digest": hashlib.sha256(text.encode()).hexdigest()[:16], **provenance}
    return {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "ablation": record["name"],
        "dataset": record["dataset"],
        "criteria": record["criteria"],
        "provenance": provenance,
        "cells": [_cell_summary(cell) for cell in cells],
    }


def write_baseline(store: Store, ablation: str, out: Path) -> dict[str, Any]:
    """Write the JSON summary of an ablation to ``out`` and return it."""
    summary = baseline_summary(store, ablation)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(format_summary(summary), encoding="utf-8")
    except OSError as error:
        raise CheckInputError(f"cannot write the baseline JSON to {out}: {error.strerror}; "
                              "expected the path of a writable file") from None
    logger.debug("wrote baseline of ablation %s (%d cells) to %s", ablation,
                len(summary["cells"]), out)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """Format a summary as JSON with one line per top-level key and per cell, for short diffs."""
    lines = ["{"]
    for key, value in summary.items():
        if key != "cells":
            lines.append(f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)},")
    cells = [json.dumps(cell, allow_nan=False) for cell in summary["cells"]]
    lines.append(' "cells": [')
    lines.append(",\n".join(f"  {cell}" for cell in cells))
    lines.append(" ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def parse_baseline(data: Any, source: str) -> Baseline:
    """Validate a parsed JSON summary and build the Baseline.

    Raises:
        CheckInputError: naming ``source``, the key path, the value found and what
            was expected.
    """
    def fail(key: str, message: str) -> CheckInputError:
        where = f"{source}: {key}: " if key else f"{source}: "
        return CheckInputError(f"{where}{message}; expected a baseline written by "
                               f"'mnistbench baseline save' (format {BASELINE_FORMAT!r}, "
                               f"version {BASELINE_VERSION})")

    if not isinstance(data, Mapping):
        raise fail("", f"the top level is {type(data).__name__}, not an object")
    if data.get("format") != BASELINE_FORMAT:
        raise fail("format", f"found {data.get('format')!r}")
    if data.get("version") != BASELINE_VERSION:
        raise fail("version", f"found {data.get('version')!r}; this mnistbench reads "
                              f"version {BASELINE_VERSION}")
    if not isinstance(data.get("ablation"), str):
        raise fail("ablation", f"found {data.get('ablation')!r}, not a string")
    criteria_data = data.get("criteria")
    try:
        criteria = Criteria(**criteria_data)
    except (TypeError, ValueError) as error:
        raise fail("criteria", f"invalid criteria {criteria_data!r}: {error}") from None
    cells_data = data.get("cells")
    if not isinstance(cells_data, list):
        raise fail("cells", f"found {type(cells_data).__name__}, not a list")

    cells: dict[str, CellRuns] = {}
    for index, item in enumerate(cells_data):
        try:
            cell = _parse_cell(item)
        except ValueError as error:
            raise fail(f"cells[{index}]", str(error)) from None
        if cell.cell_id in cells:
            raise fail(f"cells[{index}].cell_id", f"cell {cell.cell_id!r} appears twice")
        cells[cell.cell_id] = cell
    dataset = data.get("dataset")
    return Baseline(source, data["ablation"], criteria, cells,
                    dataset if isinstance(dataset, str) else None)


def _baseline_from_store(path: Path, ablation: str) -> Baseline:
    with Store(path, readonly=True) as store:
        names = store.ablation_names()
        if ablation not in names and len(names) == 1:
            logger.info("baseline store %s does not contain ablation %s; using its only "
                        "ablation %s", path, ablation, names[0])
            ablation = names[0]
        try:
            record = store.ablation(ablation)
        except StoreError as error:
            raise CheckInputError(f"baseline {error}") from None
        cells, _ = read_cells(store, ablation)
    criteria = Criteria(**record["criteria"])
    return Baseline(str(path), ablation, criteria, {cell.cell_id: cell for cell in cells},
                    record["dataset"])


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckInputError(f"baseline {path} is neither a store nor a JSON file; give a "
                              f"store or a file written by 'mnistbench baseline save'") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckInputError(f"baseline {path} is not valid JSON ({error}); give a store or "
                              f"a file written by 'mnistbench baseline save'") from None


def _parse_cell(item: Any) -> CellRuns:
    """Build one cell's runs from its summary entry; raise ValueError naming the bad key."""
    if not isinstance(item, Mapping):
        raise ValueError(f"found {type(item).__name__}, not an object")
    missing = [key for key in CELL_KEYS if key not in item]
    if missing:
        raise ValueError(f"missing keys {', '.join(missing)}")

    if not isinstance(item["cell_id"], str):
        raise ValueError(f"cell_id is {item['cell_id']!r}, not a string")
    levels = item["levels"]
    if not isinstance(levels, Mapping) or not all(isinstance(v, str) for v in levels.values()):
        raise ValueError(f"levels is {levels!r}, not an object of level strings")

    length = len(item["seeds"]) if isinstance(item["seeds"], list) else -1
    for key in CELL_KEYS[2:]:
        if not isinstance(item[key], list) or len(item[key]) != length:
            raise ValueError(f"{key} must be a list as long as seeds ({length} entries), "
                             f"found {item[key]!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in item["seeds"]):
        raise ValueError(f"seeds must be integers, found {item['seeds']!r}")
    if len(set(item["seeds"])) != length:
        raise ValueError(f"seeds must be distinct, found {item['seeds']!r}")
    for key in ("converged", "collapsed"):
        if not all(isinstance(flag, bool) for flag in item[key]):
            raise ValueError(f"{key} must be true or false per seed, found {item[key]!r}")

    numbers = {}
    for key in ("accuracy", "max_class_share"):
        values = item[key]
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and 0.0 <= v <= 1.0) for v in values):
            raise ValueError(f"{key} must be numbers in [0, 1] or null, found {values!r}")
        numbers[key] = tuple(math.nan if v is None else float(v) for v in values)

    order = np.argsort(item["seeds"], kind="stable")
    return CellRuns(
        cell_id=item["cell_id"],
        levels=dict(levels),
        seeds=tuple(int(item["seeds"][i]) for i in order),
        accuracy=tuple(numbers["accuracy"][i] for i in order),
        converged=tuple(item["converged"][i] for i in order),
        collapsed=tuple(item["collapsed"][i] for i in order),
        max_class_share=tuple(numbers["max_class_share"][i] for i in order),
    )


def _cell_summary(cell: CellRuns) -> dict[str, Any]:
    return {
        "cell_id": cell.cell_id,
        "levels": dict(cell.levels),
        "seeds": list(cell.seeds),
        "accuracy": [_rounded(v) for v in cell.accuracy],
        "converged": list(cell.converged),
        "collapsed": list(cell.collapsed),
        "max_class_share": [_rounded(v) for v in cell.max_class_share],
    }


def _column(cell: CellRuns, metric: str) -> list[float]:
    if metric == "accuracy":
        return list(cell.accuracy)
    if metric == "converged":
        return [float(flag) for flag in cell.converged]
    raise ValueError(f"unknown metric {metric!r}; expected 'accuracy' or 'converged'")


def _float(value: Any) -> float:
    """Return a finite float, or NaN for None, pandas NA and non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, DIGITS)

