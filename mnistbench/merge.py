"""Merge stores: combine the stores of shards, or of separate machines, into one store.

    report = merge_stores("stores/all.sqlite", ["stores/part-1.sqlite", "stores/part-2.sqlite"])
    print(report.runs_added, report.notes)

Ablations, cells, members, runs and epochs are copied into the output store, which
may be new or already hold results. Claims are not copied, because they belong to
``ablate`` processes that write to the input stores. Everything is checked before
anything is written, and the output store changes in one transaction, so a refused
merge leaves it as it was. A new output store is created only when the merge passes.

The rules:

- An ablation in several stores must have the same resolved matrix (apart from the
  path it was read from) and the same members, so that the stores were keyed for
  one dataset and one device type.
- A run key found in several stores must have the same result: outcome, metrics,
  confusion matrix, error text and per-epoch metrics, with floats equal within
  ``FLOAT_TOLERANCE``. Its timing, host, device name and provenance may differ.
  The copy from the first store that has it is kept.
- Within one ablation, each cell and seed must have at most one stored run, because
  report and check reject a store where it has two.
- Within one ablation, runs with another dataset MD5 or another package version
  are rejected unless ``allow_mismatch`` is set, because their numbers are not
  comparable. Other git commits and torch versions are only reported in
  ``MergeReport.notes``: a cluster's nodes often differ in them (a CPU and a CUDA
  build of one torch release, for example) while training the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mnistbench.errors import MnistbenchError, StoreError
from mnistbench.store import PROVENANCE_KEYS, Store, describe_duplicates, duplicated_runs

logger = logging.getLogger(__name__)

REJECTED_MISMATCHES = {"dataset_md5": "dataset", "package_version": "mnistbench version"}
REPORTED_MISMATCHES = ("git_commit", "torch_version")
# Columns that describe when, where and how fast a run trained, or with which
# software, but not what it produced. Two copies of one run may differ in them.
RUN_CONTEXT_COLUMNS = frozenset({"train_seconds", "device", "host", "finished_at",
                                 *PROVENANCE_KEYS})
EPOCH_CONTEXT_COLUMNS = frozenset({"seconds"})
# Two copies of a run agree when their floats differ by at most this much. CUDA
# kernels may sum in another order from one run to the next, and test accuracy on
# 10,000 examples moves in steps of 1e-4, so 1e-6 cannot hide another prediction.
FLOAT_TOLERANCE = 1e-6
# Keys of the resolved matrix that do not change its runs: the file it was read from.
MATRIX_CONTEXT_KEYS = ("source",)


@dataclass
class StoreContents:
    """Every row of one store that a merge copies, as dicts keyed by column name."""

    path: Path
    ablations: dict[str, dict]  # by ablation name
    cells: dict[str, list[dict]]  # by ablation name
    members: dict[str, list[dict]]  # by ablation name
    runs: dict[str, dict]  # by run key
    epochs: dict[str, list[dict]]  # by run key, in epoch order
    claims: int  # runs that an ablate process has claimed and not finished


@dataclass(frozen=True)
class MergeReport:
    """Counts and notes from one merge into an output store."""

    output: Path
    stored: dict[str, tuple[int, int]]  # ablation name -> (runs stored, runs in the matrix)
    runs_added: int  # runs new to the output store
    runs_already_present: int  # copies of runs that the output or an earlier input held
    notes: tuple[str, ...]  # provenance differences merged anyway, inputs with claimed runs


def read_contents(connection: sqlite3.Connection, path: Path) -> StoreContents:
    """Read the ablations, cells, members, runs, epochs and claim count of a store."""

    def rows(query: str) -> list[dict]:
        cursor = connection.execute(query)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    contents = StoreContents(path, {}, {}, {}, {}, {}, 0)
    for row in rows("SELECT * FROM ablations"):
        contents.ablations[row["name"]] = row
    for row in rows("SELECT * FROM cells ORDER BY ablation, cell_index"):
        contents.cells.setdefault(row["ablation"], []).append(row)
    for row in rows("SELECT * FROM members ORDER BY ablation, cell_id, seed"):
        contents.members.setdefault(row["ablation"], []).append(row)
    for row in rows("SELECT * FROM runs"):
        contents.runs[row["run_key"]] = row
    for row in rows("SELECT * FROM epochs ORDER BY run_key, epoch"):
        contents.epochs.setdefault(row["run_key"], []).append(row)
    contents.claims = connection.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    return contents


def merge_stores(output: str | Path, inputs: Sequence[str | Path], *,
                 allow_mismatch: bool = False) -> MergeReport:
    """Copy the ablations and runs of the input stores into the output store.

    Args:
        output: the store to write; created when missing.
        inputs: the stores to read; none of them may be the output store.
        allow_mismatch: merge runs of another dataset MD5 or package version into one
            ablation instead of raising.

    Raises:
        StoreError: an input is missing or not a store, two stores disagree about an
            ablation or a run, the merge would give a cell and seed two runs, or (without
            ``allow_mismatch``) an ablation's runs have other dataset MD5s or package
            versions.
    """
    output = Path(output)
    for path in map(Path, inputs):
        if output.exists() and path.exists() and path.resolve() == output.resolve():
            raise MnistbenchError(
                f"the output store {output} is also an input; name the other stores only, "
                f"or write to a new file")
    sources = []
    for path in map(Path, inputs):
        with Store(path, readonly=True) as store:
            sources.append(read_contents(store.connection, path))
    if not output.exists():
        _combine(sources, allow_mismatch)  # raises before the output file is created
    with Store(output) as store, store.transaction():
        existing = read_contents(store.connection, output)
        merged = _combine([existing, *sources], allow_mismatch)
        added = _write(store.connection, existing, merged)
    stored = {}
    for name, (source, _) in merged.ablations.items():
        keys = [member["run_key"] for member in source.members.get(name, [])]
        stored[name] = (sum(key in merged.runs for key in keys), len(keys))
    logger.debug("merged %d stores into %s: %d runs added", len(sources), output, added)
    claims = [f"{source.path} has {source.claims} claimed runs: an ablate may still be "
              f"training into it, so merge again after it finishes"
              for source in sources if source.claims]
    return MergeReport(output=output, stored=stored, runs_added=added,
                       runs_already_present=merged.duplicates,
                       notes=tuple(claims + merged.notes))


@dataclass
class _Merged:
    ablations: dict[str, tuple[StoreContents, dict]]  # name -> (first store with it, row)
    runs: dict[str, tuple[StoreContents, dict]]  # run key -> (first store with it, row)
    duplicates: int
    notes: list[str]


def _combine(sources: Sequence[StoreContents], allow_mismatch: bool) -> _Merged:
    """Check that the stores agree and pick the first copy of every ablation and run."""
    notes = _check_provenance(sources, allow_mismatch)
    ablations: dict[str, tuple[StoreContents, dict]] = {}
    for source in sources:
        for name, row in source.ablations.items():
            if name in ablations:
                _check_same_ablation(name, ablations[name][0], source)
            else:
                ablations[name] = (source, row)
    runs: dict[str, tuple[StoreContents, dict]] = {}
    duplicates = 0
    for source in sources:
        for key, row in source.runs.items():
            if key in runs:
                _check_same_run(key, runs[key][0], source)
                duplicates += 1
            else:
                runs[key] = (source, row)
    for name, (source, _) in ablations.items():
        _check_one_run_per_seed(name, source.members.get(name, []), runs, sources)
    return _Merged(ablations, runs, duplicates, notes)


def _check_one_run_per_seed(name: str, members: list[dict],
                            runs: dict[str, tuple[StoreContents, dict]],
                            sources: Sequence[StoreContents]) -> None:
    """Raise StoreError when the merged ablation would map a cell and seed to two runs."""
    stored = [(m["cell_id"], m["seed"], m["run_key"]) for m in members if m["run_key"] in runs]
    duplicated = duplicated_runs(stored)
    if not duplicated:
        return

    def locate(key: str) -> str:
        paths = [str(source.path) for source in sources if key in source.runs]
        return f"{key} (in {', '.join(paths)})"

    raise StoreError(
        f"ablation '{name}' would contain duplicated runs: "
        f"{describe_duplicates(duplicated, locate)}; every cell and seed must have one run, "
        f"so report and check would reject the merged store; leave out the store with the "
        f"unwanted run, or train the ablation again into a fresh store")


def _check_provenance(sources: Sequence[StoreContents], allow_mismatch: bool) -> list[str]:
    """Return notes on mixed provenance within an ablation, and raise for rejected keys."""
    notes = []
    names = sorted({name for source in sources for name in source.ablations})
    for name in names:
        for key in PROVENANCE_KEYS:
            seen: dict[str, Counter] = {}  # value -> runs per store path
            for source in sources:
                for member in source.members.get(name, []):
                    run = source.runs.get(member["run_key"])
                    if run is not None:
                        seen.setdefault(run[key], Counter())[str(source.path)] += 1
            if len(seen) < 2:
                continue
            values = "; ".join(
                f"{value!r} in " + ", ".join(f"{path} ({count} runs)"
                                             for path, count in stores.items())
                for value, stores in seen.items())
            message = f"ablation '{name}' mixes {key} values: {values}"
            if key in REJECTED_MISMATCHES and not allow_mismatch:
                raise StoreError(
                    f"{message}. Runs of another {REJECTED_MISMATCHES[key]} are not comparable, "
                    f"so merge rejects them; pass --allow-mismatch to merge them anyway")
            notes.append(message)
    return notes


def _check_same_ablation(name: str, first: StoreContents, other: StoreContents) -> None:
    matrices = []
    for source in (first, other):
        matrix = json.loads(source.ablations[name]["matrix_json"])
        for key in MATRIX_CONTEXT_KEYS:
            matrix.pop(key, None)
        matrices.append(matrix)
    difference = _first_difference(matrices[0], matrices[1])
    if difference is not None:
        path, first_value, other_value = difference
        raise StoreError(
            f"ablation '{name}' comes from different matrices: {path} is {first_value!r} in "
            f"{first.path} but {other_value!r} in {other.path}; merge only stores of one "
            f"matrix, or give one matrix another name")
    first_members = {(m["run_key"], m["cell_id"], m["seed"]) for m in first.members.get(name, [])}
    other_members = {(m["run_key"], m["cell_id"], m["seed"]) for m in other.members.get(name, [])}
    if first_members != other_members:
        raise StoreError(
            f"ablation '{name}' has {len(other_members - first_members)} runs in {other.path} "
            f"that {first.path} lacks, and {len(first_members - other_members)} the other way; "
            f"run keys include the dataset MD5, the device type and, for convolution runs "
            f"on the CPU, the build of the compiled kernels, so the stores were keyed for "
            f"other data, another device type (cpu or cuda) or kernels built by another "
            f"compiler, flags or sources; merge only stores trained on one dataset and one "
            f"device type, with one $CC and one version of mnistbench")


def _first_difference(first: object, other: object, path: str = "") -> tuple[str, object,
                                                                            object] | None:
    """Return (dotted key path, first value, other value) where two JSON values differ."""
    if isinstance(first, dict) and isinstance(other, dict):
        for key in sorted(set(first) | set(other)):
            inner = f"{path}.{key}" if path else str(key)
            found = _first_difference(first.get(key), other.get(key), inner)
            if found is not None:
                return found
        return None
    if first != other:
        return path or "the matrix", first, other
    return None


def _check_same_run(key: str, first: StoreContents, other: StoreContents) -> None:
    first_row, other_row = first.runs[key], other.runs[key]
    for column, value in first_row.items():
        if column not in RUN_CONTEXT_COLUMNS and not _same(value, other_row[column]):
            _raise_run_conflict(key, column, value, other_row[column], first, other)
    first_epochs, other_epochs = first.epochs.get(key, []), other.epochs.get(key, [])
    if len(first_epochs) != len(other_epochs):
        _raise_run_conflict(key, "epoch count", len(first_epochs), len(other_epochs), first,
                            other)
    for first_epoch, other_epoch in zip(first_epochs, other_epochs):
        for column, value in first_epoch.items():
            if column not in EPOCH_CONTEXT_COLUMNS and not _same(value, other_epoch[column]):
                _raise_run_conflict(key, f"epoch {first_epoch['epoch']} {column}", value,
                                    other_epoch[column], first, other)


def _same(first: object, other: object) -> bool:
    if isinstance(first, float) or isinstance(other, float):
        if first is None or other is None:
            return first is other
        return math.isclose(float(first), float(other), rel_tol=0.0, abs_tol=FLOAT_TOLERANCE)
    return first == other


def _raise_run_conflict(key: str, what: str, first_value: object, other_value: object,
                        first: StoreContents, other: StoreContents) -> None:
    raise StoreError(
        f"run {key} has {what} {first_value!r} in {first.path} but {other_value!r} in "
        f"{other.path}; one run key must give one result, so one of the stores was written "
        f"by other code; merge without one of them")


def _write(connection: sqlite3.Connection, existing: StoreContents, merged: _Merged) -> int:
    """Insert what the output store lacks and return how many runs were added."""
    for name, (source, row) in merged.ablations.items():
        if name in existing.ablations:
            continue
        _insert(connection, "ablations", [row])
        _insert(connection, "cells", source.cells.get(name, []))
        _insert(connection, "members", source.members.get(name, []))
    added = 0
    for key, (source, row) in merged.runs.items():
        if key in existing.runs:
            continue
        _insert(connection, "runs", [row])
        _insert(connection, "epochs", source.epochs.get(key, []))
        added += 1
    return added


def _insert(connection: sqlite3.Connection, table: str, rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    connection.executemany(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        [tuple(row[column] for column in columns) for row in rows])
