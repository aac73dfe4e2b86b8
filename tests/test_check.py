"""Tests of the CI gate: thresholds, baselines, output formats and exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from builders import Planned, build_store
from mnistbench.baseline import load_baseline, write_baseline
from mnistbench.check import FAIL, NO_BASELINE, NOISE, PASS, CheckReport, run_check
from mnistbench.cli.check import render_json, render_junit, render_markdown, render_table
from mnistbench.errors import CheckInputError, StoreError
from mnistbench.store import Store

ABLATIONS = Path(__file__).resolve().parents[1] / "ablations"
MATRIX = {"name": "t", "seeds": 5, "factors": {"activation": ["relu", "sigmoid"]}}
RELU, SIGMOID = "activation=relu", "activation=sigmoid"

THRESHOLDS = """
rules:
  - select: all
    min_median_accuracy: 0.85
    min_convergence_rate: 0.8
    max_collapse_rate: 0.1
"""


def steady(accuracy: float, step: float = 0.002):
    """Plan every run of every cell at ``accuracy`` plus ``step`` per seed."""
    return lambda cell, seed: Planned(accuracy=accuracy + step * seed)


def make_store(path: Path, plan, matrix: dict = MATRIX) -> Path:
    build_store(path, matrix, plan).close()
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def statuses(report: CheckReport) -> dict[tuple[str, str], str]:
    """Map (cell id, metric) to status."""
    return {(c.cell_id, c.metric): c.status for c in report.checks}


def only(report: CheckReport, cell_id: str, metric: str):
    matches = [c for c in report.checks if c.cell_id == cell_id and c.metric == metric]
    assert len(matches) == 1, f"{len(matches)} checks of {cell_id} {metric}"
    return matches[0]


@pytest.fixture
def good_store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "good.sqlite", steady(0.95))


@pytest.fixture
def thresholds(tmp_path: Path) -> Path:
    return write(tmp_path / "thresholds.yaml", THRESHOLDS)


# -- thresholds ----------------------------------------------------------------------


def test_good_store_passes_thresholds(good_store: Path, thresholds: Path) -> None:
    report = run_check(good_store, thresholds)

    assert report.exit_code == 0
    assert report.ablation == "t"
    assert len(report.checks) == 2 * 5
    median = only(report, RELU, "min_median_accuracy")
    assert median.status == PASS
    assert median.value == pytest.approx(0.954)
    assert median.lower <= median.value <= median.upper
    assert median.reason.startswith("cell activation=relu: median accuracy 0.954 >= minimum 0.850")
    assert only(report, SIGMOID, "min_convergence_rate").value == 1.0
    assert only(report, SIGMOID, "max_collapse_rate").value == 0.0


def test_low_accuracy_fails_with_reason(tmp_path: Path, thresholds: Path) -> None:
    store = make_store(tmp_path / "s.sqlite", lambda cell, seed: Planned(
        accuracy=0.80 + 0.005 * seed if cell.levels["activation"] == "relu" else 0.95))
    report = run_check(store, thresholds)

    median = only(report, RELU, "min_median_accuracy")
    assert report.exit_code == 1
    assert median.status == FAIL
    assert re.fullmatch(
        r"cell activation=relu: median accuracy 0\.810 < minimum 0\.850 \(95% bootstrap "
        r"interval of the median \[0\.\d{3}, 0\.\d{3}\], 5 runs\)", median.reason)
    # Accuracy 0.80-0.82 is below the default convergence accuracy 0.9.
    assert only(report, RELU, "min_convergence_rate").status == FAIL
    assert only(report, SIGMOID, "min_median_accuracy").status == PASS


def test_collapse_rate_above_maximum_fails(tmp_path: Path, thresholds: Path) -> None:
    store = make_store(tmp_path / "s.sqlite", lambda cell, seed: Planned(
        accuracy=0.1, collapse_class=7) if seed < 2 else Planned(accuracy=0.95))
    report = run_check(store, thresholds)

    collapse = only(report, RELU, "max_collapse_rate")
    assert collapse.status == FAIL
    assert collapse.value == pytest.approx(0.4)
    assert "collapse rate 0.400 > maximum 0.100" in collapse.reason
    assert "2 of 5 runs collapsed" in collapse.reason


def test_diverged_runs_leave_accuracy_undefined(tmp_path: Path, thresholds: Path) -> None:
    store = make_store(tmp_path / "s.sqlite", lambda cell, seed: Planned(diverged_at=2)
                       if cell.levels["activation"] == "sigmoid" or seed == 0
                       else Planned(accuracy=0.95))
    report = run_check(store, thresholds)

    relu = only(report, RELU, "min_median_accuracy")
    assert relu.status == PASS
    assert relu.runs == "4 of 5"
    assert "4 of 5 runs with a final accuracy" in relu.reason
    sigmoid = only(report, SIGMOID, "min_median_accuracy")
    assert sigmoid.status == FAIL
    assert sigmoid.value is None
    assert "undefined because none of its 5 runs has a final accuracy" in sigmoid.reason
    assert only(report, SIGMOID, "min_convergence_rate").value == 0.0


def test_later_rule_overrides_earlier(good_store: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", """
rules:
  - select: {}
    min_median_accuracy: 0.99
    min_convergence_rate: 0.8
  - select: {activation: [sigmoid, relu]}
    min_median_accuracy: 0.90
  - select: {cell: "activation=sigmoid"}
    min_convergence_rate: null
""")
    report = run_check(good_store, path)

    assert only(report, RELU, "min_median_accuracy").name == "median accuracy >= 0.900"
    assert only(report, RELU, "min_median_accuracy").rule == "rules[1]"
    assert only(report, RELU, "min_convergence_rate").status == PASS
    assert (SIGMOID, "min_convergence_rate") not in statuses(report)
    assert report.exit_code == 0


def test_level_written_as_number_matches(tmp_path: Path) -> None:
    matrix = {"name": "t", "seeds": 2,
              "factors": {"dropout": [0.0, 0.5], "lr": [0.001, 0.1], "width": [50, 100]}}
    store = make_store(tmp_path / "s.sqlite", steady(0.95), matrix)
    path = write(tmp_path / "t.yaml", """
rules:
  - select: {dropout: 0.5, lr: 1e-3, width: 100.0}
    min_median_accuracy: 0.9
  - select: {dropout: "0.0", width: "50"}
    min_median_accuracy: 0.9
""")
    report = run_check(store, path)

    cells = sorted(c.cell_id for c in report.checks if c.kind == "threshold")
    assert cells == ["dropout=0.0,lr=0.001,width=50", "dropout=0.0,lr=0.1,width=50",
                     "dropout=0.5,lr=0.001,width=100"]


# -- invalid thresholds --------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    pytest.param("rules:\n  - select: all\n    min_median_acuracy: 0.9\n",
                 r"rules\[0\]\.min_median_acuracy: unknown rule key 'min_median_acuracy'; "
                 r"allowed: .*did you mean 'min_median_accuracy'\?", id="rule-key-typo"),
    pytest.param("rule:\n  - select: all\n", r"unknown top-level key 'rule'.*did you mean 'rules'",
                 id="top-level-typo"),
    pytest.param("tolerance: {acuracy: 0.1}\n", r"tolerance\.acuracy: .*did you mean 'accuracy'",
                 id="tolerance-typo"),
    pytest.param("rules:\n  - select: all\n    min_median_accuracy: 85\n",
                 r"rules\[0\]\.min_median_accuracy: expected a number in \[0, 1\], or null "
                 r"to remove the threshold, found 85 \(integer\)", id="accuracy-above-one"),
    pytest.param("rules:\n  - select: all\n    max_collapse_rate: -0.1\n",
                 r"max_collapse_rate: expected a number in \[0, 1\].*found -0\.1", id="negative"),
    pytest.param("rules:\n  - select: all\n    min_convergence_rate: '0.8'\n",
                 r"found '0\.8' \(string\)", id="quoted-number"),
    pytest.param("tolerance: {accuracy: 2}\n", r"tolerance\.accuracy: expected a number in "
                 r"\[0, 1\], found 2", id="tolerance-above-one"),
    pytest.param("rules:\n  - select: all\n", r"rules\[0\]: the rule sets no threshold",
                 id="no-threshold"),
    pytest.param("rules:\n  - min_median_accuracy: 0.9\n", r"rules\[0\]\.select: missing",
                 id="no-select"),
    pytest.param("rules:\n  - select: everything\n    min_median_accuracy: 0.9\n",
                 r"rules\[0\]\.select: expected 'all'", id="select-string"),
    pytest.param("rules:\n  - select: {cell: x, activation: relu}\n    min_median_accuracy: 0.9\n",
                 r"cannot be combined with factors", id="cell-and-factor"),
    pytest.param("rules: {select: all}\n", r"rules: expected a list of rules", id="rules-mapping"),
    pytest.param("- 1\n", r"expected a mapping with keys ablation, tolerance, rules",
                 id="top-level-list"),
    pytest.param("rules: []\nrules: []\n",
                 r"invalid YAML at line 2, column 1: duplicated key 'rules'$",
                 id="duplicated-key"),
    pytest.param("rules: [ {select: all, min_median_accuracy: 0.5\n",
                 r"invalid YAML at line 2, column 1: expected ',' or '}', but got "
                 r"'<stream end>'$", id="unclosed-flow"),
])
def test_invalid_thresholds_rejected(good_store: Path, tmp_path: Path, text: str,
                                     message: str) -> None:
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(CheckInputError, match=re.escape(str(path)) + ".*" + message):
        run_check(good_store, path)


@pytest.mark.parametrize("select, message", [
    pytest.param("{activaton: relu}", r"rules\[0\]\.select\.activaton: unknown factor "
                 r"'activaton'; factors of the ablation: activation, width; did you mean "
                 r"'activation'\?", id="unknown-factor"),
    pytest.param("{activation: rleu}", r"rules\[0\]\.select\.activation: unknown level 'rleu' "
                 r"\(string\) of factor 'activation'; levels: relu, sigmoid; did you mean "
                 r"'relu'\?", id="unknown-level"),
    pytest.param("{width: 10}", r"unknown level 10 \(integer\) of factor 'width'; "
                 r"levels: 50, 100", id="unknown-number-level"),
    pytest.param("{cell: 'activation=relu,width=10'}", r"select\.cell: cell "
                 r"'activation=relu,width=10' not found in ablation 't'.*did you mean "
                 r"'activation=relu,width=100'\?", id="unknown-cell"),
    pytest.param("{activation: sigmoid, width: 50}", r"rules\[0\]\.select: selector "
                 r"\{activation: sigmoid, width: 50\} matches no cell of ablation 't'",
                 id="unmatched-selector"),
])
def test_invalid_selector_rejected(tmp_path: Path, select: str, message: str) -> None:
    matrix = {"name": "t", "seeds": 2,
              "factors": {"activation": ["relu", "sigmoid"], "width": [50, 100]},
              "exclude": [{"activation": "sigmoid", "width": 50}]}
    store = make_store(tmp_path / "s.sqlite", steady(0.95), matrix)
    path = write(tmp_path / "t.yaml", f"rules:\n  - select: {select}\n"
                                      f"    min_median_accuracy: 0.9\n")
    with pytest.raises(CheckInputError, match=message):
        run_check(store, path)


# -- bad stores ----------------------------------------------------------------------


def test_duplicated_run_rejected(good_store: Path, thresholds: Path) -> None:
    with Store(good_store, create=False) as store:
        key, cell_id, seed = store.connection.execute(
            "SELECT run_key, cell_id, seed FROM members WHERE seed = 3 ORDER BY cell_id"
        ).fetchone()
        row = list(store.connection.execute("SELECT * FROM runs WHERE run_key = ?", (key,))
                   .fetchone())
        row[0] = "duplicate0000000"
        with store.transaction():
            store.connection.execute(f"INSERT INTO runs VALUES ({', '.join('?' * len(row))})",
                                     row)
            store.connection.execute("INSERT INTO members VALUES ('t', ?, ?, ?)",
                                     ("duplicate0000000", cell_id, seed))

    runs = ", ".join(sorted([key, "duplicate0000000"]))  # listed in key order
    with pytest.raises(StoreError, match=rf"contains duplicated runs: cell {cell_id} seed 3 "
                                         rf"has runs {runs}"):
        run_check(good_store, thresholds)


def test_cells_without_runs_rejected(tmp_path: Path, thresholds: Path) -> None:
    store = make_store(tmp_path / "s.sqlite", lambda cell, seed: None
                       if cell.levels["activation"] == "sigmoid" else Planned())
    with pytest.raises(CheckInputError, match=r"1 cells of ablation 't' have no finished runs: "
                                              r"activation=sigmoid; run 'mnistbench ablate'"):
        run_check(store, thresholds)


def test_cells_without_runs_named_up_to_five(tmp_path: Path, thresholds: Path) -> None:
    matrix = {"name": "t", "seeds": 2, "factors": {"activation": ["relu", "sigmoid", "tanh"],
                                                    "width": [8, 16, 32, 64]}}
    store = make_store(tmp_path / "s.sqlite", lambda cell, seed: None, matrix)
    with pytest.raises(CheckInputError, match=r"12 cells of ablation 't' have no finished "
                       r"runs: (activation=\w+,width=\d+, ){4}activation=\w+,width=\d+ and 7 "
                       r"more; run 'mnistbench ablate'"):
        run_check(store, thresholds)


def test_missing_store_rejected(tmp_path: Path, thresholds: Path) -> None:
    with pytest.raises(StoreError, match=r"store not found: .*nothing\.sqlite"):
        run_check(tmp_path / "nothing.sqlite", thresholds)


def test_missing_thresholds_file_rejected(good_store: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckInputError, match=r"^thresholds file not found: .*absent\.yaml; "
                                              r"ablations/thresholds\.yaml is an example$"):
        run_check(good_store, tmp_path / "absent.yaml")



def test_thresholds_directory_rejected(good_store: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckInputError, match=rf"^thresholds file {re.escape(str(tmp_path))} "
                                              r"is a directory; expected a YAML file"):
        run_check(good_store, tmp_path)


def test_undecodable_thresholds_rejected(good_store: Path, tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"rules: [\xe9]")
    with pytest.raises(CheckInputError, match=r"cannot read thresholds file .*latin1\.yaml: "
                                              r".*; expected UTF-8 text"):
        run_check(good_store, path)

def test_unknown_ablation_rejected(good_store: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", "ablation: smoke\n" + THRESHOLDS)
    with pytest.raises(StoreError, match=r"ablation 'smoke' not found in store .*; stored "
                                         r"ablations: t"):
        run_check(good_store, path)
    assert run_check(good_store, path, ablation="t").ablation == "t"


# -- baselines -----------------------------------------------------------------------


def test_no_baseline_is_explicit(good_store: Path, thresholds: Path) -> None:
    report = run_check(good_store, thresholds)

    baseline_checks = [c for c in report.checks if c.kind == "baseline"]
    assert [c.status for c in baseline_checks] == [NO_BASELINE] * 4
    assert baseline_checks[0].reason == ("cell activation=relu: mean accuracy not compared "
                                         "because no baseline was given")
    assert report.counts() == {PASS: 6, FAIL: 0, NOISE: 0, NO_BASELINE: 4}


def test_cell_absent_from_baseline_is_explicit(good_store: Path, thresholds: Path,
                                               tmp_path: Path) -> None:
    baseline = make_store(tmp_path / "base.sqlite", steady(0.95),
                          {"name": "t", "seeds": 5, "factors": {"activation": ["relu"]}})
    report = run_check(good_store, thresholds, baseline_path=baseline)

    assert only(report, RELU, "accuracy").status == PASS
    absent = only(report, SIGMOID, "accuracy")
    assert absent.status == NO_BASELINE
    assert f"the baseline {baseline} has no finished runs of this cell" in absent.reason
    assert report.exit_code == 0



def test_baseline_of_other_cells_rejected(good_store: Path, thresholds: Path,
                                          tmp_path: Path) -> None:
    """A baseline that shares no cell with the ablation would let every check pass."""
    baseline = make_store(tmp_path / "base.sqlite", steady(0.95),
                          {"name": "t", "seeds": 5, "factors": {"activation": ["tanh"]}})
    with pytest.raises(CheckInputError, match=rf"baseline {re.escape(str(baseline))} has none "
                                              rf"of the 2 cells of ablation 't', so it would "
                                              rf"check nothing \(its cells start "
                                              rf"activation=tanh, the ablation's "
                                              rf"activation=relu; .*\); save a baseline"):
        run_check(good_store, thresholds, baseline_path=baseline)


def test_baseline_without_finished_runs_rejected(good_store: Path, thresholds: Path,
                                                 tmp_path: Path) -> None:
    empty = make_store(tmp_path / "empty.sqlite", lambda cell, seed: None)
    with pytest.raises(CheckInputError, match=r"baseline .*empty\.sqlite has no finished runs, "
                                              r"so it would check nothing"):
        run_check(good_store, thresholds, baseline_path=empty)


def test_baseline_of_unfinished_ablation_rejected(tmp_path: Path) -> None:
    empty = make_store(tmp_path / "empty.sqlite", lambda cell, seed: None)
    with Store(empty, create=False) as store:
        with pytest.raises(CheckInputError, match=r"ablation 't' in .*empty\.sqlite has no "
                                                  r"finished runs, so its baseline would hold "
                                                  r"nothing"):
            write_baseline(store, "t", tmp_path / "baseline.json")
    assert not (tmp_path / "baseline.json").exists()

def test_paired_regression_fails(good_store: Path, thresholds: Path, tmp_path: Path) -> None:
    current = make_store(tmp_path / "current.sqlite", lambda cell, seed: Planned(
        accuracy=0.85 + 0.003 * seed if cell.levels["activation"] == "relu"
        else 0.95 + 0.002 * seed))
    report = run_check(current, thresholds, baseline_path=good_store)

    drop = only(report, RELU, "accuracy")
    assert report.exit_code == 1
    assert drop.status == FAIL
    assert drop.value == pytest.approx(-0.098)
    assert drop.upper < -0.01
    assert drop.runs == "5 paired"
    assert re.fullmatch(
        r"cell activation=relu: mean accuracy dropped by 0\.098 against the baseline "
        r"\(0\.954 -> 0\.856\), beyond the tolerance 0\.010 \(95% bootstrap interval of the "
        r"difference \[-0\.\d{3}, -0\.\d{3}\], 5 paired seeds\)", drop.reason)
    assert only(report, RELU, "convergence_rate").status == FAIL
    assert only(report, SIGMOID, "accuracy").status == PASS


def test_drop_within_noise_passes(good_store: Path, thresholds: Path, tmp_path: Path) -> None:
    # One of five seeds drops by 0.1: the mean drops by 0.02, beyond the tolerance 0.01,
    # but resamples without that seed give no drop, so the interval reaches 0.
    current = make_store(tmp_path / "current.sqlite", lambda cell, seed: Planned(
        accuracy=0.95 + 0.002 * seed - (0.1 if seed == 4 else 0.0)))
    report = run_check(current, thresholds, baseline_path=good_store)

    drop = only(report, RELU, "accuracy")
    assert drop.status == NOISE
    assert drop.value == pytest.approx(-0.02)
    assert drop.upper >= -0.01
    assert "dropped by 0.020 against the baseline (0.954 -> 0.934), more than the tolerance " \
           "0.010, but within noise" in drop.reason
    # Seed 4 at 0.858 also stops converging: the convergence rate drops by 0.2 in noise.
    assert only(report, RELU, "convergence_rate").status == NOISE
    assert report.counts()[NOISE] == 4
    assert report.exit_code == 0


def test_unpaired_when_seeds_differ(good_store: Path, thresholds: Path, tmp_path: Path) -> None:
    current = make_store(tmp_path / "current.sqlite", steady(0.80),
                         {**MATRIX, "seeds": [0, 1, 2]})
    report = run_check(current, thresholds, baseline_path=good_store)

    drop = only(report, RELU, "accuracy")
    assert drop.status == FAIL
    assert drop.runs == "3 vs 5"
    assert "unpaired, 3 vs 5 runs" in drop.reason


def test_baseline_without_accuracy_not_compared(good_store: Path, thresholds: Path,
                                                tmp_path: Path) -> None:
    baseline = make_store(tmp_path / "base.sqlite", lambda cell, seed: Planned(diverged_at=1))
    report = run_check(good_store, thresholds, baseline_path=baseline)

    accuracy = only(report, RELU, "accuracy")
    assert accuracy.status == NO_BASELINE
    assert "no baseline run of this cell has a final accuracy" in accuracy.reason
    rate = only(report, RELU, "convergence_rate")
    assert rate.status == PASS
    assert rate.value == 1.0


def test_baseline_reclassified_under_current_criteria(tmp_path: Path, thresholds: Path) -> None:
    # At accuracy 0.93 the baseline's runs converged under 0.9; under the current 0.95
    # they are stalled, like the current runs, so the convergence rate did not drop.
    baseline = make_store(tmp_path / "base.sqlite", steady(0.93, 0.0))
    current = make_store(tmp_path / "current.sqlite", steady(0.93, 0.0),
                         {**MATRIX, "criteria": {"convergence_accuracy": 0.95}})
    report = run_check(current, thresholds, baseline_path=baseline)

    rate = only(report, RELU, "convergence_rate")
    assert rate.status == PASS
    assert rate.reference == 0.0
    assert rate.current == 0.0


def test_baseline_json_round_trip(good_store: Path, thresholds: Path, tmp_path: Path) -> None:
    current = make_store(tmp_path / "current.sqlite", lambda cell, seed: Planned(
        accuracy=0.85 + 0.003 * seed if cell.levels["activation"] == "relu"
        else 0.95 + 0.002 * seed - (0.1 if seed == 4 else 0.0)))
    out = tmp_path / "baseline.json"
    with Store(good_store, create=False) as store:
        summary = write_baseline(store, "t", out)

    assert out.stat().st_size < 4096
    assert summary["cells"][0]["cell_id"] == RELU
    assert summary["cells"][0]["seeds"] == [0, 1, 2, 3, 4]
    assert summary["cells"][0]["converged"] == [True] * 5
    assert len(summary["provenance"]["digest"]) == 16
    from_store = run_check(current, thresholds, baseline_path=good_store)
    from_json = run_check(current, thresholds, baseline_path=out)
    assert statuses(from_json) == statuses(from_store)
    assert {FAIL, NOISE, PASS} <= set(statuses(from_json).values())
    for a, b in zip(from_json.checks, from_store.checks):
        assert a.value == pytest.approx(b.value, abs=1e-6)
        assert a.upper == pytest.approx(b.upper, abs=1e-6)


def test_baseline_json_is_deterministic(good_store: Path, tmp_path: Path) -> None:
    with Store(good_store, create=False) as store:
        write_baseline(store, "t", tmp_path / "a.json")
        write_baseline(store, "t", tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def valid_summary() -> dict:
    return {"format": "mnistbench-baseline", "version": 1, "ablation": "t", "dataset": "mnist",
            "criteria": {"convergence_accuracy": 0.9, "collapse_share": 0.9},
            "provenance": {"digest": "0" * 16},
            "cells": [{"cell_id": RELU, "levels": {"activation": "relu"}, "seeds": [0, 1],
                       "accuracy": [0.95, None], "converged": [True, False],
                       "collapsed": [False, False], "max_class_share": [0.1, None]}]}


def changed(path: str, value) -> dict:
    data = valid_summary()
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    target[last] = value
    return data


def dropped(key: str) -> dict:
    data = valid_summary()
    del data["cells"][0][key]
    return data


@pytest.mark.parametrize("data, message", [
    pytest.param([1], r"the top level is list, not an object", id="list"),
    pytest.param(changed("format", "other"), r"format: found 'other'", id="format"),
    pytest.param(changed("version", 2), r"version: found 2; this mnistbench reads version 1",
                 id="version"),
    pytest.param(changed("criteria", {"convergence_accuracy": 2}), r"criteria: invalid",
                 id="criteria"),
    pytest.param(changed("cells", {}), r"cells: found dict, not a list", id="cells-dict"),
    pytest.param(changed("cells.0.accuracy", [0.9]), r"cells\[0\]: accuracy must be a list as "
                 r"long as seeds \(2 entries\)", id="short-column"),
    pytest.param(changed("cells.0.accuracy", [1.5, None]), r"cells\[0\]: accuracy must be "
                 r"numbers in \[0, 1\] or null", id="accuracy-range"),
    pytest.param(changed("cells.0.converged", [1, 0]),
                 r"cells\[0\]: converged must be true or false", id="flag-type"),
    pytest.param(changed("cells.0.seeds", [0, 0]), r"cells\[0\]: seeds must be distinct",
                 id="seeds"),
    pytest.param(dropped("levels"), r"cells\[0\]: missing keys levels", id="missing-key"),
])
def test_invalid_baseline_json_rejected(tmp_path: Path, data, message: str) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckInputError, match=re.escape(str(path)) + ": " + message):
        load_baseline(path, "t")


def test_valid_baseline_json_loads(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(valid_summary()), encoding="utf-8")
    baseline = load_baseline(path, "t")
    cell = baseline.cells[RELU]
    assert cell.seeds == (0, 1)
    assert cell.accuracy[0] == 0.95
    assert cell.converged == (True, False)


@pytest.mark.parametrize("content, message", [
    pytest.param(b"{not json", r"is not valid JSON", id="broken-json"),
    pytest.param(b"\xff\xfe\x00binary", r"is neither a store nor a JSON file", id="binary"),
])
def test_unreadable_baseline_rejected(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "baseline.json"
    path.write_bytes(content)
    with pytest.raises(CheckInputError, match=message):
        load_baseline(path, "t")


def test_missing_baseline_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckInputError, match=r"cannot read baseline .*absent\.json: No such"):
        load_baseline(tmp_path / "absent.json", "t")


# -- the smoke thresholds ------------------------------------------------------------


def smoke_plan(relu_default: float):
    """Plan the smoke cells near the accuracies measured on CPU, with relu/default given."""
    measured = {("sigmoid", "default"): 0.89, ("sigmoid", "large_normal"): 0.81,
                ("relu", "default"): relu_default, ("relu", "large_normal"): 0.75}
    return lambda cell, seed: Planned(
        accuracy=measured[cell.levels["activation"], cell.levels["init"]] + 0.003 * seed)


def test_smoke_thresholds_match_smoke_matrix(tmp_path: Path) -> None:
    matrix = yaml.safe_load((ABLATIONS / "smoke.yaml").read_text(encoding="utf-8"))
    good = make_store(tmp_path / "good.sqlite", smoke_plan(0.93), matrix)
    weak = make_store(tmp_path / "weak.sqlite", smoke_plan(0.87), matrix)

    passed = run_check(good, ABLATIONS / "thresholds.yaml")
    failed = run_check(weak, ABLATIONS / "thresholds.yaml")
    assert passed.ablation == "smoke"
    assert passed.counts()[FAIL] == 0
    assert passed.counts()[PASS] == 10
    assert [(c.cell_id, c.name) for c in failed.checks if c.status == FAIL] == [
        ("activation=relu,init=default", "median accuracy >= 0.900")]


# -- outputs -------------------------------------------------------------------------


@pytest.fixture
def mixed_report(good_store: Path, thresholds: Path, tmp_path: Path) -> CheckReport:
    """2 cells x 5 checks: relu regresses (3 FAIL), sigmoid drops within noise (2 NOISE)."""
    current = make_store(tmp_path / "current.sqlite", lambda cell, seed: Planned(
        accuracy=0.85 + 0.003 * seed if cell.levels["activation"] == "relu"
        else 0.95 + 0.002 * seed - (0.1 if seed == 4 else 0.0)))
    report = run_check(current, thresholds, baseline_path=good_store)
    assert report.counts() == {PASS: 5, FAIL: 3, NOISE: 2, NO_BASELINE: 0}
    return report


def test_junit_has_testcase_per_check(mixed_report: CheckReport) -> None:
    root = ET.fromstring(render_junit(mixed_report))

    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    failures = suite.findall("testcase/failure")
    assert root.tag == "testsuites"
    assert len(cases) == 10
    assert suite.get("tests") == "10"
    assert suite.get("failures") == "3"
    assert len(failures) == 3
    assert all(f.get("message").startswith("cell activation=relu: ") for f in failures)
    assert failures[0].get("message") == [c for c in mixed_report.checks
                                          if c.status == FAIL][0].reason
    assert {f.get("type") for f in failures} == {"threshold", "baseline"}
    assert cases[0].get("classname") == "t.activation=relu"
    assert cases[0].get("name") == "median accuracy >= 0.850"


def test_junit_marks_no_baseline_skipped(good_store: Path, thresholds: Path) -> None:
    root = ET.fromstring(render_junit(run_check(good_store, thresholds)))

    skipped = root.findall("testsuite/testcase/skipped")
    assert len(skipped) == 4
    assert root.find("testsuite").get("skipped") == "4"
    assert "no baseline was given" in skipped[0].get("message")


def test_markdown_has_headline_and_row_per_check(mixed_report: CheckReport) -> None:
    text = render_markdown(mixed_report)
    lines = text.splitlines()

    headline = re.fullmatch(r"\*\*mnistbench check (passed|failed) for ablation t: (\d+) failed, "
                            r"(\d+) passed, (\d+) within noise, (\d+) without baseline "
                            r"\((\d+) checks\)\*\*", lines[0])
    assert headline is not None, lines[0]
    assert headline.groups() == ("failed", "3", "5", "2", "0", "10")
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| STATUS | CELL | CHECK | VALUE | 95% INTERVAL | RUNS |"
    assert len(table) == 2 + 10
    assert table[2].split(" | ")[:3] == ["| PASS", "`activation=relu`",
                                         "median accuracy >= 0.850"]
    assert table[3].split(" | ")[:3] == ["| **FAIL**", "`activation=relu`",
                                         "convergence rate >= 0.800"]
    assert sum(line.startswith("- cell ") for line in lines) == 5


def test_json_lists_every_check(mixed_report: CheckReport) -> None:
    data = json.loads(render_json(mixed_report))

    assert data["passed"] is False
    assert data["exit_code"] == 1
    assert data["counts"] == {"PASS": 5, "FAIL": 3, "NOISE": 2, "NO-BASELINE": 0}
    assert len(data["checks"]) == 10
    first = data["checks"][0]
    assert first["cell_id"] == RELU
    assert first["levels"] == {"activation": "relu"}
    assert first["metric"] == "min_median_accuracy"
    assert first["status"] == "PASS"
    assert first["limit"] == 0.85
    assert first["rule"] == "rules[0]"
    assert first["lower"] <= first["value"] <= first["upper"]
    drop = data["checks"][3]
    assert (drop["kind"], drop["metric"], drop["status"]) == ("baseline", "accuracy", "FAIL")
    assert drop["limit"] == -0.01
    assert drop["reference"] == pytest.approx(0.954)
    assert drop["reason"].startswith("cell activation=relu: mean accuracy dropped by 0.098")


def test_table_has_line_per_check(mixed_report: CheckReport) -> None:
    lines = render_table(mixed_report).splitlines()

    assert lines[0].split() == ["STATUS", "CELL", "CHECK", "VALUE", "95%", "INTERVAL", "RUNS"]
    rows = lines[1:11]
    assert [row.split()[0] for row in rows] == [c.status for c in mixed_report.checks]
    assert len({row.index("activation") for row in rows}) == 1
    assert lines[-1] == ("mnistbench check failed for ablation t: 3 failed, 5 passed, "
                         "2 within noise, 0 without baseline (10 checks)")


# -- command line --------------------------------------------------------------------


def mnistbench(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnistbench", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_exit_codes(good_store: Path, thresholds: Path, tmp_path: Path) -> None:
    regressed = make_store(tmp_path / "regressed.sqlite", steady(0.80))
    baseline = tmp_path / "out" / "baseline.json"
    saved = mnistbench("baseline", "save", good_store, "--out", baseline)
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.startswith(f"wrote baseline of ablation t to {baseline}: 2 cells, 10 runs")

    passed = mnistbench("check", good_store, "--thresholds", thresholds, "--baseline", baseline,
                        "--junit", tmp_path / "j.xml", "--summary", tmp_path / "s.md",
                        "--json", tmp_path / "r.json")
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.splitlines()[-1].startswith("mnistbench check passed")
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["PASS"] == 10
    assert ET.parse(tmp_path / "j.xml").getroot().find("testsuite").get("tests") == "10"
    assert (tmp_path / "s.md").read_text().startswith("**mnistbench check passed")

    failed = mnistbench("check", regressed, "--thresholds", thresholds, "--baseline", baseline)
    assert failed.returncode == 1, failed.stderr
    assert "failures:\n  cell activation=relu: median accuracy 0.804 < minimum 0.850" \
           in failed.stdout

    typo = write(tmp_path / "typo.yaml", "rules:\n  - select: all\n    min_median_acuracy: 1\n")
    invalid = mnistbench("check", good_store, "--thresholds", typo)
    assert invalid.returncode == 2
    assert invalid.stderr.startswith("error: ")
    assert "did you mean 'min_median_accuracy'?" in invalid.stderr


def test_nothing_to_check_is_bad_input(good_store: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("rules: []\n")
    with pytest.raises(CheckInputError, match=r"empty\.yaml: nothing to check: no rule sets a "
                                              r"threshold for any cell and no --baseline"):
        run_check(good_store, empty)


def test_baseline_of_another_dataset_rejected(good_store: Path, thresholds: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "baseline.json"
    with Store(good_store, create=False) as store:
        write_baseline(store, "t", out)
    data = json.loads(out.read_text())
    data["dataset"] = "fashion-mnist"
    out.write_text(json.dumps(data))
    with pytest.raises(CheckInputError, match=r"was trained on dataset 'fashion-mnist', but "
                                              r"ablation 't' in .* on 'mnist'"):
        run_check(good_store, thresholds, baseline_path=out)


@pytest.mark.parametrize("option, name, kind", [
    pytest.param("--junit", "check.xml", "JUnit XML", id="junit"),
    pytest.param("--summary", "summary.md", "Markdown summary", id="summary"),
    pytest.param("--json", "check.json", "JSON report", id="json"),
])
def test_output_directory_rejected(good_store: Path, thresholds: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture, option: str, name: str,
                                   kind: str) -> None:
    from mnistbench.cli import main

    directory = tmp_path / "reports"
    directory.mkdir()
    status = main(["check", str(good_store), "--thresholds", str(thresholds), option,
                   str(directory)])
    assert status == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: {option} {directory} is a directory; expected the path "
                            f"of a file to write the {kind} to, such as {directory / name}\n")
    # The path is checked before the check runs, so no table is printed.
    assert captured.out == ""


def test_output_under_file_rejected(good_store: Path, thresholds: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    status = main(["check", str(good_store), "--thresholds", str(thresholds), "--junit",
                   str(blocker / "check.xml")])
    assert status == 2
    assert capsys.readouterr().err == (
        f"error: --junit {blocker / 'check.xml'}: {blocker} is a file, not a directory; "
        f"expected the path of a file to write the JUnit XML to\n")


def test_unwritable_output_names_option(good_store: Path, thresholds: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mnistbench.cli import main

    target = tmp_path / "check.xml"

    def reject(self: Path, *args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    # Permission bits do not stop root, so the write itself is made to fail.
    monkeypatch.setattr(Path, "write_text", reject)
    status = main(["check", str(good_store), "--thresholds", str(thresholds), "--junit",
                   str(target)])
    assert status == 2
    assert capsys.readouterr().err == (
        f"error: --junit {target}: cannot write the JUnit XML: Permission denied; expected "
        f"the path of a writable file\n")


def test_baseline_out_directory_rejected(good_store: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    directory = tmp_path / "baselines"
    directory.mkdir()
    status = main(["baseline", "save", str(good_store), "--out", str(directory)])
    assert status == 2
    assert capsys.readouterr().err == (
        f"error: --out {directory} is a directory; expected the path of a file to write the "
        f"baseline JSON to, such as {directory / 'baseline.json'}\n")
    assert list(directory.iterdir()) == []


def test_unwritable_baseline_names_path(good_store: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "baseline.json"

    def reject(self: Path, *args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", reject)
    with Store(good_store, create=False) as store:
        with pytest.raises(CheckInputError, match=r"cannot write the baseline JSON to .*"
                                                  r"baseline\.json: Permission denied; expected "
                                                  r"the path of a writable file"):
            write_baseline(store, "t", target)


@pytest.mark.parametrize("option", ["--junit", "--summary", "--json"])
def test_output_over_store_rejected(good_store: Path, thresholds: Path, option: str,
                                    capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    before = good_store.read_bytes()
    status = main(["check", str(good_store), "--thresholds", str(thresholds), option,
                   str(good_store)])
    assert status == 2
    assert f"error: {option} {good_store} is also the store; expected a new file" in (
        capsys.readouterr().err)
    assert good_store.read_bytes() == before


def test_output_over_thresholds_rejected(good_store: Path, thresholds: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    before = thresholds.read_text()
    status = main(["check", str(good_store), "--thresholds", str(thresholds), "--json",
                   str(thresholds)])
    assert status == 2
    assert f"--json {thresholds} is also the --thresholds file" in capsys.readouterr().err
    assert thresholds.read_text() == before


def test_output_over_other_sqlite_rejected(good_store: Path, thresholds: Path,
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    other = tmp_path / "other.sqlite"
    other.write_bytes(good_store.read_bytes())
    status = main(["check", str(good_store), "--thresholds", str(thresholds), "--summary",
                   str(other)])
    assert status == 2
    assert f"--summary {other} is an SQLite file, which this would overwrite" in (
        capsys.readouterr().err)
    assert other.read_bytes() == good_store.read_bytes()


def test_two_outputs_one_file_rejected(good_store: Path, thresholds: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    target = tmp_path / "out.txt"
    status = main(["check", str(good_store), "--thresholds", str(thresholds), "--json",
                   str(target), "--summary", str(target)])
    assert status == 2
    assert f"--summary and --json both name {target}" in capsys.readouterr().err
    assert not target.exists()


def test_baseline_over_store_rejected(good_store: Path, capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    before = good_store.read_bytes()
    status = main(["baseline", "save", str(good_store), "--out", str(good_store)])
    assert status == 2
    assert f"--out {good_store} is also the store" in capsys.readouterr().err
    assert good_store.read_bytes() == before


def test_unwritable_report_folder_exits_2(good_store: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mnistbench.cli import main

    target = tmp_path / "locked" / "report"

    def reject(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted", str(self))

    # Permission bits do not stop root, so creating the folder is made to fail.
    monkeypatch.setattr(Path, "mkdir", reject)
    status = main(["report", str(good_store), "--out", str(target)])
    assert status == 2
    err = capsys.readouterr().err
    assert "permission denied; choose a path that this user can write" in err
    assert "Traceback" not in err


def test_store_write_failure_exits_2(good_store: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from mnistbench.cli import main
    from mnistbench.cli import check as cli_check

    def fail(args: object) -> int:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(cli_check, "run_baseline_save", fail)
    status = main(["baseline", "save", str(good_store), "--out", "unused.json"])
    assert status == 2
    assert capsys.readouterr().err == (
        "error: the store could not be written: attempt to write a readonly database; "
        "check that the store file and its folder are writable\n")
