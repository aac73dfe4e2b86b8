"""Tests of matrix files: expansion into cells and runs, validation messages, overrides,
and the ``mnistbench matrix show`` command."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mnistbench.cli.matrix import render_summary
from mnistbench.errors import MatrixError
from mnistbench.matrix import (
    Criteria,
    Matrix,
    Settings,
    apply_overrides,
    format_level,
    load_matrix,
    parse_matrix,
)
from mnistbench.matrix_checks import TRAIN_SIZES

REPO = Path(__file__).resolve().parent.parent


def write_matrix(tmp_path: Path, body: str, *, name: str = "test") -> Path:
    """Write tmp_path/matrix.yaml, starting with `name: NAME` unless ``name`` is None, and return its path."""
    path = tmp_path / "matrix.yaml"
    header = f"name: {name}\n" if name is not None else ""
    path.write_text(header + body, encoding="utf-8")
    return path


def load(tmp_path: Path, body: str) -> Matrix:
    return load_matrix(write_matrix(tmp_path, body))


def cell_ids(matrix: Matrix) -> list[str]:
    return [cell.cell_id for cell in matrix.cells()]


# Expansion ------------------------------------------------------------------------------

EXPANSION_CASES = [
    pytest.param(
        "factors:\n  activation: [relu, tanh]\n",
        ["activation=relu", "activation=tanh"],
        id="one-factor",
    ),
    pytest.param(
        "factors:\n  width: [50, 100]\n  activation: [relu, tanh]\n",
        [
            "width=50,activation=relu",
            "width=50,activation=tanh",
            "width=100,activation=relu",
            "width=100,activation=tanh",
        ],
        id="two-factors-declared-order",
    ),
    pytest.param(
        "factors:\n  setup:\n    mlp: {conv: false}\n    conv: {conv: true, pool: true}\n"
        "  activation: [relu]\n",
        ["setup=mlp,activation=relu", "setup=conv,activation=relu"],
        id="bundle-factor",
    ),
    pytest.param(
        "factors:\n  activation: [relu, sigmoid]\n  init: [default, large_normal]\n"
        "exclude:\n  - {activation: relu, init: large_normal}\n",
        ["activation=relu,init=default", "activation=sigmoid,init=default", "activation=sigmoid,init=large_normal"],
        id="exclusion",
    ),
    pytest.param(
        "factors:\n  pool: [false, true]\n  dropout: [0, 0.5]\n  train_subset: [null, 1000]\n",
        [
            f"pool={pool},dropout={dropout},train_subset={subset}"
            for pool in ("false", "true")
            for dropout in ("0.0", "0.5")
            for subset in ("none", "1000")
        ],
        id="bool-float-null-levels",
    ),
    pytest.param("train:\n  epochs: 1\n", ["base"], id="no-factors"),
    pytest.param("factors:\n  width: [100.0, 6e1]\n", ["width=100", "width=60"], id="integral-floats-for-int"),
    pytest.param("factors:\n  lr: [1e-3, 1]\n", ["lr=0.001", "lr=1.0"], id="exponent-float-and-int-for-float"),
]


@pytest.mark.parametrize(("body", "expected_ids"), EXPANSION_CASES)
def test_cells_expand_in_declared_order(tmp_path, body, expected_ids):
    matrix = load(tmp_path, body)

    cells = matrix.cells()

    assert [cell.cell_id for cell in cells] == expected_ids
    assert [cell.index for cell in cells] == list(range(len(expected_ids)))


def test_cell_levels_and_settings_follow_factors(tmp_path):
    matrix = load(
        tmp_path,
        "train:\n  lr: 0.1\n  epochs: 1\n"
        "factors:\n  lr: [0.01]\n  setup:\n    mlp: {}\n    conv: {conv: true, pool: true}\n",
    )

    mlp, conv = matrix.cells()

    assert dict(conv.levels) == {"lr": 0.01, "setup": "conv"}
    assert list(conv.levels) == ["lr", "setup"]
    assert conv.settings.lr == 0.01  # the factor takes precedence over train
    assert conv.settings.epochs == 1  # train settings reach every cell
    assert conv.settings.conv is True
    assert conv.settings.input_features() == 391
    assert mlp.settings.conv is False
    assert mlp.settings.input_features() == 784
    assert matrix.train.lr == 0.1


def test_train_setting_that_a_factor_sets_is_reported(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mnistbench.matrix")
    matrix = load(tmp_path, "train: {width: 50, lr: 0.1}\nfactors:\n  width: [80, 100]\n"
                            "  setup:\n    mlp: {}\n    fast: {lr: 1.0}\n")
    assert [cell.settings.width for cell in matrix.cells()] == [80, 80, 100, 100]
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / 'matrix.yaml'}: train.width 50 is not used, because factor 'width' "
        f"sets width in every cell"]  # lr 0.1 still reaches the mlp cells: no warning


def test_batch_larger_than_subset_is_reported(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mnistbench.matrix")
    load(tmp_path, "train: {train_subset: 2000}\nfactors:\n  batch_size: [128, 5000]\n")
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / 'matrix.yaml'}: batch_size is larger than train_subset in 1 of 2 "
        f"cells, so each of their epochs is one step over the whole subset; first: "
        f"batch_size=5000"]


def test_cell_levels_are_read_only(tmp_path):
    cell = load(tmp_path, "factors:\n  width: [10]\n").cells()[0]

    with pytest.raises(TypeError):
        cell.levels["width"] = 20  # type: ignore[index]


def test_exclusion_renumbers_indexes(tmp_path):
    matrix = load(
        tmp_path, "factors:\n  width: [10, 20, 30]\nexclude:\n  - {width: 10}\n"
    )

    cells = matrix.cells()

    assert [(cell.index, cell.cell_id) for cell in cells] == [(0, "width=20"), (1, "width=30")]


@pytest.mark.parametrize(
    ("seeds_line", "expected"),
    [
        pytest.param("seeds: 3\n", (0, 1, 2), id="count"),
        pytest.param("seeds: [5, 2, 9]\n", (5, 2, 9), id="list-keeps-order"),
        pytest.param("", (0, 1, 2, 3, 4), id="default-five"),
        pytest.param("seeds: 1\n", (0,), id="count-one"),
    ],
)
def test_seeds_from_count_or_list(tmp_path, seeds_line, expected):
    matrix = load(tmp_path, seeds_line + "factors:\n  width: [10]\n")

    assert matrix.seeds == expected


def test_cell_ids_stable_across_loads(tmp_path):
    body = "factors:\n  activation: [relu, gelu]\n  dropout: [0.0, 0.25]\n  conv: [false, true]\n"
    first = load(tmp_path, body)
    second = load(tmp_path, body)

    assert cell_ids(first) == cell_ids(second)
    assert first.cells() == second.cells()


def test_cell_ids_readable(tmp_path):
    matrix = load(
        tmp_path,
        "factors:\n  activation: [relu]\n  init: [xavier]\n  pool: [true]\n  lr: [0.0001]\n",
    )

    (cell,) = matrix.cells()

    assert cell.cell_id == "activation=relu,init=xavier,pool=true,lr=0.0001"
    assert re.fullmatch(r"[a-z_]+=[^,=]+(,[a-z_]+=[^,=]+)*", cell.cell_id)


def test_runs_count_and_cell_major_order(tmp_path):
    matrix = load(tmp_path, "seeds: 3\nfactors:\n  activation: [relu, tanh]\n")

    runs = matrix.runs()

    assert len(runs) == 6
    assert [(cell.cell_id, seed) for cell, seed in runs] == [
        ("activation=relu", 0),
        ("activation=relu", 1),
        ("activation=relu", 2),
        ("activation=tanh", 0),
        ("activation=tanh", 1),
        ("activation=tanh", 2),
    ]


def test_matrix_fields_from_file(tmp_path):
    path = write_matrix(
        tmp_path,
        "dataset: ./data/digits\nseeds: [1]\nfactors:\n  pool: [yes]\n"
        "criteria:\n  convergence_accuracy: 0.95\n",
    )

    matrix = load_matrix(path)

    assert matrix.name == "test"
    assert matrix.dataset == "./data/digits"
    assert matrix.source == str(path)
    assert matrix.text == path.read_text()
    assert matrix.factors["pool"] == (True,)  # YAML 1.1 reads an unquoted yes as true
    assert matrix.criteria == Criteria(convergence_accuracy=0.95, collapse_share=0.9)


def test_to_dict_is_json(tmp_path):
    matrix = load(
        tmp_path,
        "factors:\n  width: [10]\n  setup:\n    conv: {conv: true}\nexclude: []\n",
    )

    data = json.loads(json.dumps(matrix.to_dict()))

    assert data["name"] == "test"
    assert data["seeds"] == [0, 1, 2, 3, 4]
    assert data["factors"] == {"width": [10], "setup": ["conv"]}
    assert data["bundles"] == {"setup": {"conv": {"conv": True}}}
    assert data["train"] == Settings().to_dict()
    assert data["criteria"] == {"convergence_accuracy": 0.9, "collapse_share": 0.9}


def test_parse_matrix_without_file():
    matrix = parse_matrix({"name": "inline", "factors": {"width": [10, 20]}})

    assert matrix.source is None
    assert cell_ids(matrix) == ["width=10", "width=20"]
    with pytest.raises(MatrixError, match=r"^matrix: factors.width\[0\]: must be an integer"):
        parse_matrix({"name": "inline", "factors": {"width": ["ten"]}})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(True, "true", id="true"),
        pytest.param(False, "false", id="false"),
        pytest.param(0.5, "0.5", id="float"),
        pytest.param(0.0001, "0.0001", id="small-float"),
        pytest.param(None, "none", id="none"),
        pytest.param(100, "100", id="int"),
        pytest.param("relu", "relu", id="string"),
    ],
)
def test_format_level(value, expected):
    assert format_level(value) == expected


@pytest.mark.parametrize(
    ("conv", "pool", "expected"),
    [
        pytest.param(False, False, 784, id="raw"),
        pytest.param(True, False, 782, id="conv"),
        pytest.param(False, True, 392, id="pool"),
        pytest.param(True, True, 391, id="conv-pool"),
    ],
)
def test_settings_input_features(conv, pool, expected):
    assert Settings(conv=conv, pool=pool).input_features() == expected


def test_settings_normalize_numbers():
    settings = Settings(lr=1, width=100.0)

    assert settings.lr == 1.0
    assert isinstance(settings.lr, float)
    assert settings.width == 100
    assert isinstance(settings.width, int)
    assert list(settings.to_dict())[:3] == ["activation", "init", "conv"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"activation": "rleu"}, r"Settings.activation must be one of .*did you mean 'relu'", id="choice"),
        pytest.param({"width": True}, r"Settings.width must be an integer in \[1, 16384\], got true", id="bool-for-int"),
        pytest.param({"dropout": 1.0}, r"Settings.dropout must be in \[0, 1\), got 1.0", id="range"),
        pytest.param({"optimizer": "adam", "momentum": 0.5}, r"momentum must be 0 with optimizer adam", id="adam-momentum"),
    ],
)
def test_settings_reject_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Settings(**kwargs)


def test_criteria_reject_out_of_range():
    with pytest.raises(ValueError, match=r"Criteria.collapse_share must be in \(0.1, 1\], got 1.5"):
        Criteria(collapse_share=1.5)


def test_train_sizes_cover_known_datasets():
    from mnistbench.data import KNOWN_DATASETS

    assert set(TRAIN_SIZES) == set(KNOWN_DATASETS)


# Validation -----------------------------------------------------------------------------

FACTORS_AR = "factors:\n  activation: [relu, sigmoid]\n"
BUNDLES = "factors:\n  setup:\n    mlp: {conv: false}\n    conv: {conv: true}\n"

# (file body after the name line, or a whole file when it starts with "!"; expected message)
ERROR_CASES = [
    # whole file
    pytest.param("!", r"the matrix is empty", id="empty-file"),
    pytest.param("!- a\n- b\n", r"must be a mapping with the keys name, .*got a list", id="not-mapping"),
    pytest.param(
        "factors:\n  activation: relu: tanh\n",
        r"invalid YAML at line 3, column \d+: mapping values are not allowed here",
        id="yaml-syntax",
    ),
    pytest.param("name: again\n", r"invalid YAML at line 2, column 1: duplicate key 'name'", id="duplicate-key"),
    pytest.param("factor:\n  width: [1]\n", r"factor: unknown top-level key 'factor'.*did you mean 'factors'\?", id="unknown-top-level"),
    pytest.param("!factors:\n  width: [1]\n", r"name: missing; every matrix needs a name", id="missing-name"),
    pytest.param("!name: a b\n", r"name: must be a non-empty string of letters.*got 'a b' \(string\)", id="name-with-space"),
    pytest.param("!name: 12\n", r"name: must be .*got 12 \(integer\)", id="name-not-string"),
    pytest.param("dataset: mnsit\n", r"dataset: unknown dataset 'mnsit'.*directory path.*did you mean 'mnist'\?", id="dataset-typo"),
    pytest.param("dataset: 3\n", r"dataset: must be mnist or fashion-mnist or a directory path, got 3", id="dataset-not-string"),
    # train
    pytest.param("train: [1]\n", r"train: must be a mapping of settings, got a list", id="train-not-mapping"),
    pytest.param("train:\n  lrr: 0.1\n", r"train.lrr: unknown setting 'lrr'; expected one of activation, .*did you mean 'lr'\?", id="unknown-setting"),
    pytest.param("train:\n  lr: 0\n", r"train.lr: must be > 0, got 0$", id="lr-zero"),
    pytest.param("train:\n  lr: .inf\n", r"train.lr: must be a finite number > 0, got inf", id="lr-infinite"),
    pytest.param("train:\n  lr: '0.1'\n", r"train.lr: must be a number > 0, got '0.1' \(string\); write the number without quotes", id="quoted-number"),
    pytest.param("train:\n  batch_size: 0\n", r"train.batch_size: must be an integer in \[1, 65536\], got 0", id="batch-size-zero"),
    pytest.param("train:\n  epochs: 0\n", r"train.epochs: must be an integer in \[1, 10000\], got 0", id="epochs-zero"),
    pytest.param("train:\n  weight_decay: -0.1\n", r"train.weight_decay: must be >= 0, got -0.1", id="negative-weight-decay"),
    pytest.param("train:\n  momentum: 1\n", r"train.momentum: must be in \[0, 1\), got 1", id="momentum-one"),
    pytest.param("train:\n  train_subset: 0\n", r"train.train_subset: must be an integer >= 1, got 0", id="subset-zero"),
    pytest.param("train:\n  train_subset: 60001\n", r"train.train_subset: must be at most 60000, the training set size", id="subset-above-mnist"),
    pytest.param(
        "dataset: fashion-mnist\ntrain:\n  train_subset: 70000\n",
        r"train.train_subset: must be at most 60000",
        id="subset-above-fashion-mnist",
    ),
    pytest.param("train:\n  precision: fp16\n", r"train.precision: must be one of float32, tf32, bf16, got 'fp16'", id="unknown-precision"),
    pytest.param("train:\n  optimizer: adam\n  momentum: 0.9\n", r"train: momentum must be 0 with optimizer adam, got 0.9", id="adam-momentum-train"),
    # factors
    pytest.param("factors: [activation]\n", r"factors: must be a mapping of factor -> levels, got a list", id="factors-not-mapping"),
    pytest.param("factors:\n  activaton: [relu]\n", r"factors.activaton: unknown factor 'activaton'.*did you mean 'activation'\?", id="unknown-factor"),
    pytest.param("factors:\n  activation: relu\n", r"factors.activation: levels must be a list, got 'relu' \(string\); write \[value\]", id="levels-not-list"),
    pytest.param("factors:\n  activation:\n    fast: {}\n", r"factors.activation: activation is a setting, so its levels must be a list", id="setting-with-bundles"),
    pytest.param("factors:\n  width: []\n", r"factors.width: the level list is empty", id="empty-levels"),
    pytest.param(
        "factors:\n  activation: [relu, tanh, relu]\n",
        r"factors.activation\[2\]: duplicate level relu, already at factors.activation\[0\]",
        id="duplicate-level",
    ),
    pytest.param("factors:\n  dropout: [0, 0.0]\n", r"factors.dropout\[1\]: duplicate level 0.0, already at factors.dropout\[0\]", id="duplicate-after-normalizing"),
    pytest.param("factors:\n  width: [100, wide]\n", r"factors.width\[1\]: must be an integer in \[1, 16384\], got 'wide' \(string\)", id="string-for-int"),
    pytest.param("factors:\n  width: [100.5]\n", r"factors.width\[0\]: must be an integer in \[1, 16384\], got 100.5 \(number\)", id="fractional-float-for-int"),
    pytest.param("factors:\n  width: [true]\n", r"factors.width\[0\]: must be an integer in \[1, 16384\], got true \(boolean\)", id="bool-for-int"),
    pytest.param("factors:\n  width: [-5]\n", r"factors.width\[0\]: must be an integer in \[1, 16384\], got -5", id="negative-width"),
    pytest.param("factors:\n  width: [null]\n", r"factors.width\[0\]: must be an integer in \[1, 16384\], got null", id="null-for-int"),
    pytest.param("factors:\n  dropout: [true]\n", r"factors.dropout\[0\]: must be a number in \[0, 1\), got true \(boolean\)", id="bool-for-float"),
    pytest.param("factors:\n  dropout: [0.5, 1.0]\n", r"factors.dropout\[1\]: must be in \[0, 1\), got 1.0", id="dropout-one"),
    pytest.param(
        "factors:\n  activation: [relu, sigmoid, rleu]\n",
        r"factors.activation\[2\]: must be one of relu, sigmoid, tanh, gelu, got 'rleu'; did you mean 'relu'\?",
        id="unknown-categorical-level",
    ),
    pytest.param("factors:\n  activation: [1]\n", r"factors.activation\[0\]: must be one of relu, .*got 1 \(integer\)", id="int-for-categorical"),
    pytest.param("factors:\n  pool: ['true']\n", r"factors.pool\[0\]: must be true or false, got the string 'true'; write it without quotes", id="quoted-bool"),
    pytest.param("factors:\n  conv: [1]\n", r"factors.conv\[0\]: must be true or false, got 1 \(integer\)", id="int-for-bool"),
    pytest.param("factors:\n  train_subset: [100, 60001]\n", r"factors.train_subset\[1\]: must be at most 60000", id="subset-level-above-mnist"),
    pytest.param(
        "train:\n  momentum: 0.9\nfactors:\n  optimizer: [sgd, adam]\n",
        r"cell 'optimizer=adam': momentum must be 0 with optimizer adam, got 0.9.*exclude this cell",
        id="adam-momentum-cell",
    ),
    # bundle factors
    pytest.param("factors:\n  setup: {}\n", r"factors.setup: the bundle factor has no bundles", id="no-bundles"),
    pytest.param("factors:\n  setup:\n    mlp: [1]\n", r"factors.setup.mlp: must be a mapping of setting -> value", id="bundle-not-mapping"),
    pytest.param("factors:\n  setup:\n    'a=b': {}\n", r"factors.setup.a=b: a bundle name must contain only letters", id="bundle-name-with-equals"),
    pytest.param("factors:\n  setup:\n    mlp: {cnov: true}\n", r"factors.setup.mlp.cnov: unknown setting 'cnov'.*did you mean 'conv'\?", id="bundle-unknown-setting"),
    pytest.param("factors:\n  setup:\n    mlp: {dropout: 2}\n", r"factors.setup.mlp.dropout: must be in \[0, 1\), got 2", id="bundle-invalid-value"),
    pytest.param(
        "factors:\n  pool: [false, true]\n  setup:\n    mlp: {}\n    pooled: {pool: true}\n",
        r"factors.setup.pooled.pool: factor 'pool' also sets pool, and only one factor may set a setting; remove pool from this bundle or from factor 'pool'",
        id="bundle-overlaps-factor",
    ),
    pytest.param(
        "factors:\n  front:\n    conv: {conv: true}\n  setup:\n    mlp: {conv: false}\n",
        r"factors.setup.mlp.conv: factor 'front' also sets conv",
        id="bundles-overlap",
    ),
    # seeds
    pytest.param("seeds: 0\n", r"seeds: must be a count or a list of seeds; a count must be an integer in \[1, 10000\], got 0", id="seeds-zero"),
    pytest.param("seeds: 100000000\n", r"seeds: .*must be an integer in \[1, 10000\], got 100000000", id="seeds-huge"),
    pytest.param("factors:\n  width: [100000000]\n", r"factors.width\[0\]: must be an integer in \[1, 16384\], got 100000000", id="width-huge"),
    pytest.param("seeds: 10000\nfactors:\n  lr: [" + ", ".join(str(0.001 * (i + 1)) for i in range(200)) + "]\n", r"factors: the factors expand to 200 cells x 10000 seeds = 2,000,000 runs; the limit is 1,000,000", id="too-many-runs"),
    pytest.param("seeds: -3\n", r"seeds: .*must be an integer in \[1, 10000\], got -3", id="seeds-negative-count"),
    pytest.param("seeds: five\n", r"seeds: .*got 'five' \(string\)", id="seeds-string"),
    pytest.param("seeds: true\n", r"seeds: .*got true \(boolean\)", id="seeds-bool"),
    pytest.param("seeds: []\n", r"seeds: the list is empty", id="seeds-empty-list"),
    pytest.param("seeds: [0, -1]\n", r"seeds\[1\]: must be an integer in \[0, 9223372036854775807\], got -1", id="seed-negative"),
    pytest.param("seeds: [1, 2, 1]\n", r"seeds\[2\]: duplicate seed 1; seeds must be distinct", id="seed-duplicate"),
    pytest.param("seeds: [0, 1.5]\n", r"seeds\[1\]: must be an integer in \[0, 9223372036854775807\], got 1.5 \(number\)", id="seed-not-int"),
    # exclude
    pytest.param(FACTORS_AR + "exclude: {activation: relu}\n", r"exclude: must be a list of factor -> level mappings, got a mapping", id="exclude-not-list"),
    pytest.param(FACTORS_AR + "exclude:\n  - {}\n", r"exclude\[0\]: must be a non-empty mapping of factor -> level, got a mapping", id="exclude-empty-entry"),
    pytest.param(
        FACTORS_AR + "exclude:\n  - {activaton: relu}\n",
        r"exclude\[0\].activaton: unknown factor 'activaton'; factors of this matrix: activation; did you mean 'activation'\?",
        id="exclude-unknown-factor",
    ),
    pytest.param(FACTORS_AR + "exclude:\n  - {lr: 0.1}\n", r"exclude\[0\].lr: unknown factor 'lr'; factors of this matrix: activation", id="exclude-setting-not-factor"),
    pytest.param(
        FACTORS_AR + "exclude:\n  - {activation: tanh}\n",
        r"exclude\[0\].activation: tanh is not a level of factor activation; levels: relu, sigmoid",
        id="exclude-unknown-level",
    ),
    pytest.param(FACTORS_AR + "exclude:\n  - {activation: rleu}\n", r"exclude\[0\].activation: must be one of .*did you mean 'relu'\?", id="exclude-invalid-level"),
    pytest.param(BUNDLES + "exclude:\n  - {setup: convv}\n", r"exclude\[0\].setup: convv is not a level of factor setup; levels: mlp, conv; did you mean 'conv'\?", id="exclude-unknown-bundle"),
    pytest.param(
        FACTORS_AR + "  width: [10, 20]\nexclude:\n  - {activation: relu}\n  - {activation: relu, width: 10}\n",
        r"exclude\[1\]: drops no cell, because earlier entries of exclude already drop every cell",
        id="exclude-matches-no-remaining-cell",
    ),
    pytest.param(
        FACTORS_AR + "exclude:\n  - {activation: relu}\n  - {activation: sigmoid}\n",
        r"exclude: drops all 2 cells, so no cell is left to run",
        id="exclude-drops-every-cell",
    ),
    # criteria
    pytest.param("criteria:\n  convergence_accuracy: 0\n", r"criteria.convergence_accuracy: must be in \(0, 1\], got 0; a criterion is a fraction", id="criterion-zero"),
    pytest.param("criteria:\n  collapse_share: 1.5\n", r"criteria.collapse_share: must be in \(0.1, 1\], got 1.5", id="criterion-above-one"),
    pytest.param("criteria:\n  collapse_share: 0.1\n", r"criteria.collapse_share: must be in \(0.1, 1\], got 0.1", id="collapse-share-at-one-in-ten"),
    # seeds and cells
    pytest.param("seeds: [18446744073709551615]\n" + FACTORS_AR, r"seeds\[0\]: must be an integer in \[0, 9223372036854775807\], got 18446744073709551615", id="seed-beyond-64-bits"),
    pytest.param("factors:\n  setup:\n    base: {}\n    mlp: {conv: false}\n", r"cell 'setup=mlp': trains the same settings as cell 'setup=base'", id="bundles-with-same-settings"),
    pytest.param("criteria:\n  collapse: 0.9\n", r"criteria.collapse: unknown criterion 'collapse'.*did you mean 'collapse_share'\?", id="unknown-criterion"),
    pytest.param("criteria: 0.9\n", r"criteria: must be a mapping of criterion -> fraction, got 0.9", id="criteria-not-mapping"),
]


@pytest.mark.parametrize(("body", "message"), ERROR_CASES)
def test_invalid_matrix_raises(tmp_path, body, message):
    if body.startswith("!"):
        path = write_matrix(tmp_path, body[1:], name=None)
    else:
        path = write_matrix(tmp_path, body)

    with pytest.raises(MatrixError, match=message) as raised:
        load_matrix(path)

    assert str(raised.value).startswith(f"{path}: ")


def test_invalid_level_message_in_full(tmp_path):
    path = write_matrix(tmp_path, "factors:\n  activation: [relu, sigmoid, rleu]\n")

    with pytest.raises(MatrixError) as raised:
        load_matrix(path)

    assert str(raised.value) == (
        f"{path}: factors.activation[2]: must be one of relu, sigmoid, tanh, gelu, "
        "got 'rleu'; did you mean 'relu'?"
    )


def test_missing_file_raises(tmp_path):
    with pytest.raises(MatrixError, match=r"^matrix file not found: .*absent.yaml; "
                                          r"ablations/default.yaml is an example$"):
        load_matrix(tmp_path / "absent.yaml")


def test_unreadable_file_raises(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(MatrixError, match=r"^cannot read matrix file .*folder.yaml: "
                                          r"\[Errno 21\] Is a directory"):
        load_matrix(tmp_path / "folder.yaml")


def test_show_singular_cell_and_seed(tmp_path):
    matrix = load(tmp_path, "seeds: 1\nfactors:\n  width: [10]\n")
    assert "runs: 1 (1 cell x 1 seed)" in render_summary(matrix).splitlines()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("train:\n  width: 50\nfactors:\n  width: [10]\n", id="factor-also-in-train"),
        pytest.param("train:\n  train_subset: 60000\nfactors:\n  width: [10]\n", id="subset-equal-to-mnist-size"),
        pytest.param("dataset: ./digits\ntrain:\n  train_subset: 100000\n", id="directory-dataset-has-no-size-limit"),
        pytest.param("train:\n  optimizer: adam\nfactors:\n  lr: [0.001]\n", id="adam-without-momentum"),
        pytest.param("factors:\n  setup:\n    base:\n", id="bundle-with-null-settings"),
    ],
)
def test_valid_edge_cases_load(tmp_path, body):
    matrix = load(tmp_path, body)

    assert len(matrix.cells()) == 1


# Overrides ------------------------------------------------------------------------------


def test_overrides_replace_train_settings(tmp_path):
    matrix = load(tmp_path, "factors:\n  activation: [relu, tanh]\n")

    overridden = apply_overrides(matrix, ["lr=1e-3", "train.epochs=1", "train_subset=null"])

    assert overridden.train.lr == 0.001
    assert overridden.train.epochs == 1
    assert overridden.train.train_subset is None
    assert [cell.settings.lr for cell in overridden.cells()] == [0.001, 0.001]
    assert matrix.train.lr == 0.1  # the original matrix is unchanged
    assert overridden.text == matrix.text


def test_no_overrides_return_same_matrix(tmp_path):
    matrix = load(tmp_path, "factors:\n  width: [10]\n")

    assert apply_overrides(matrix, []) is matrix


OVERRIDE_BODY = (
    "factors:\n  activation: [relu]\n  optimizer: [sgd, adam]\n  setup:\n    conv: {conv: true}\n"
)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        pytest.param("lr", r"^--set lr: expected KEY=VALUE, for example lr=0.001", id="no-equals"),
        pytest.param("lrr=1", r"^--set lrr=1: unknown setting 'lrr'.*did you mean 'lr'\?", id="unknown-setting"),
        pytest.param("lr=0", r"^--set lr=0: train.lr: must be > 0, got 0", id="invalid-value"),
        pytest.param("lr=fast", r"train.lr: must be a number > 0, got 'fast' \(string\)", id="string-value"),
        pytest.param("lr=[1", r"^--set lr=\[1: invalid YAML", id="invalid-yaml"),
        pytest.param("activation=tanh", r"activation is set by factor 'activation', which takes precedence", id="setting-is-factor"),
        pytest.param("conv=false", r"conv is set by factor 'setup'", id="setting-in-bundle"),
        pytest.param("train_subset=70000", r"train.train_subset: must be at most 60000", id="subset-above-mnist"),
        pytest.param("momentum=0.9", r"cell 'activation=relu,optimizer=adam,setup=conv': momentum must be 0 with optimizer adam", id="makes-cell-invalid"),
    ],
)
def test_invalid_override_raises(tmp_path, override, message):
    matrix = load(tmp_path, OVERRIDE_BODY)

    with pytest.raises(MatrixError, match=message):
        apply_overrides(matrix, [override])


# matrix show ----------------------------------------------------------------------------

SHOW_BODY = (
    "seeds: 3\ntrain:\n  epochs: 2\n  train_subset: 1000\n"
    "factors:\n  activation: [relu, sigmoid]\n  setup:\n    mlp: {}\n    conv: {conv: true, pool: true}\n"
    "exclude:\n  - {activation: sigmoid, setup: conv}\n"
)


def test_summary_lists_cells_and_cost(tmp_path):
    text = render_summary(load(tmp_path, SHOW_BODY))
    lines = text.splitlines()

    assert "  setup (bundles): mlp (base settings); conv (conv=true, pool=true)" in lines
    assert "exclude: activation=sigmoid, setup=conv" in lines
    assert re.search(r"^index +activation +setup +conv +pool$", text, re.MULTILINE)
    assert re.search(r"^1 +relu +conv +true +true$", text, re.MULTILINE)
    assert "cells: 3" in lines
    assert "runs: 9 (3 cells x 3 seeds)" in lines
    assert "model-epochs: 18 (9 runs x 2 epochs)" in lines
    assert "training examples processed: 18,000 (model-epochs x 1,000 examples)" in lines


def test_summary_directory_dataset_size_unknown(tmp_path):
    text = render_summary(load(tmp_path, "dataset: ./digits\nfactors:\n  epochs: [1, 2]\n"))

    assert "model-epochs: 15 (epochs summed over 10 runs)" in text
    assert "training examples processed: unknown" in text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnistbench", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.slow
def test_show_prints_run_count(tmp_path):
    path = write_matrix(tmp_path, SHOW_BODY)

    result = run_cli("matrix", "show", str(path), "--set", "epochs=1")

    assert result.returncode == 0, result.stderr
    assert "runs: 9 (3 cells x 3 seeds)" in result.stdout
    assert "model-epochs: 9 (9 runs x 1 epoch)" in result.stdout


@pytest.mark.slow
def test_show_json_lists_cells(tmp_path):
    path = write_matrix(tmp_path, SHOW_BODY)

    result = run_cli("matrix", "show", str(path), "--json")

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [cell["cell_id"] for cell in data["cells"]] == [
        "activation=relu,setup=mlp",
        "activation=relu,setup=conv",
        "activation=sigmoid,setup=mlp",
    ]
    assert data["cells"][1]["settings"]["conv"] is True


@pytest.mark.slow
def test_show_invalid_file_exits_2(tmp_path):
    path = write_matrix(tmp_path, "factors:\n  activation: [rleu]\n")

    result = run_cli("matrix", "show", str(path))

    assert result.returncode == 2
    assert result.stdout == ""
    assert f"error: {path}: factors.activation[0]: must be one of" in result.stderr
    assert "did you mean 'relu'?" in result.stderr
