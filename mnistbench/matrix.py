"""Matrix files: validate an ablation matrix and expand it into cells and runs.

    matrix = load_matrix("ablations/default.yaml")
    for cell, seed in matrix.runs():
        print(cell.cell_id, seed, cell.settings.lr)

A matrix file is YAML with these top-level keys (only ``name`` is required)::

    name: default            # letters, digits, "_", "." and "-"
    dataset: mnist           # mnist (default), fashion-mnist, or a directory path containing "/"
    seeds: 5                 # a count n (seeds 0..n-1) or a list of distinct ints >= 0; default 5
    train: {epochs: 3}       # base settings: any Settings field
    factors:                 # factor -> list of levels; any Settings field may be a factor
      activation: [relu, sigmoid]
      setup:                 # a bundle factor: a name that is not a setting, with
        mlp: {conv: false}   # bundle name -> the settings that the bundle applies
        conv: {conv: true, pool: true}
    exclude:                 # a cell that matches every pair of an entry is dropped
      - {activation: relu, setup: conv}
    criteria: {convergence_accuracy: 0.9, collapse_share: 0.9}

A factor's level takes precedence over the same setting in ``train``, but two factors may
not set the same setting. Without factors the matrix has one cell, with id "base".

:func:`load_matrix` checks the whole file before it returns, and every problem raises
MatrixError naming the file, the key path (``factors.activation[2]``), the value found,
the allowed values and, where one is close, a suggestion. The YAML reader differs from
PyYAML's safe loader in two ways: a duplicated key is an error, and a number with an
exponent but no dot (``1e-3``) is a float as in YAML 1.2, not a string.
"""

from __future__ import annotations

import itertools
import math
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mnistbench.errors import MatrixError
from mnistbench.matrix_checks import TOP_LEVEL_KEYS, SectionChecker, load_yaml
from mnistbench.settings import (
    SETTING_NAMES,
    Criteria,
    Settings,
    describe,
    format_level,
    same_level,
    suggest,
)

# More runs than this would take weeks on one machine; it also bounds expansion's memory.
MAX_RUNS = 1_000_000

__all__ = [
    "Cell",
    "Criteria",
    "Matrix",
    "Settings",
    "apply_overrides",
    "format_level",
    "load_matrix",
    "parse_matrix",
]

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "mnist"
DEFAULT_SEEDS = 5  # seeds 0..4 when a file does not set `seeds`
BASE_CELL_ID = "base"  # id of the single cell of a matrix without factors


@dataclass(frozen=True)
class Cell:
    """One combination of levels, with the settings that it trains."""

    index: int  # position in declared order after exclusions, from 0
    cell_id: str  # "activation=relu,init=xavier,pool=true", factors in declared order
    levels: Mapping[str, Any]  # factor -> level, in declared order; a bundle name for a bundle factor
    settings: Settings  # the matrix's base settings with this cell's levels applied


@dataclass(frozen=True)
class Matrix:
    """A validated matrix file. Build it with :func:`load_matrix` or :func:`parse_matrix`."""

    name: str
    dataset: str  # "mnist", "fashion-mnist" or a directory path
    seeds: tuple[int, ...]
    train: Settings  # base settings: the defaults updated by the file's `train` section
    factors: Mapping[str, tuple]  # factor -> levels in declared order; bundle names for a bundle factor
    exclude: tuple[Mapping[str, Any], ...]  # partial factor -> level maps of dropped cells
    criteria: Criteria
    source: str | None  # path of the file that the matrix was loaded from
    text: str  # the YAML text as given, stored with the results
    # Bundle factor -> bundle name -> the settings that the bundle applies.
    bundles: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def cells(self) -> list[Cell]:
        """Expand the factors into cells, dropping excluded ones.

        The first factor varies slowest, as in itertools.product. Indexes count the
        remaining cells from 0.
        """
        cells = []
        for levels in _combinations(self.factors):
            if any(_matches(rule, levels) for rule in self.exclude):
                continue
            cells.append(_make_cell(self, len(cells), levels))
        return cells

    def runs(self) -> list[tuple[Cell, int]]:
        """Return a (cell, seed) pair for every cell and seed, all seeds of a cell together."""
        return [(cell, seed) for cell in self.cells() for seed in self.seeds]

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved matrix as plain JSON-compatible data, without ``text``."""
        return {
            "name": self.name,
            "dataset": self.dataset,
            "seeds": list(self.seeds),
            "train": self.train.to_dict(),
            "factors": {name: list(levels) for name, levels in self.factors.items()},
            "bundles": {
                name: {bundle: dict(settings) for bundle, settings in bundles.items()}
                for name, bundles in self.bundles.items()
            },
            "exclude": [dict(rule) for rule in self.exclude],
            "criteria": {
                "convergence_accuracy": self.criteria.convergence_accuracy,
                "collapse_share": self.criteria.collapse_share,
            },
            "source": self.source,
        }


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate a matrix file.

    Raises:
        MatrixError: the file cannot be read, is not valid YAML, or is not a valid matrix.
            The message names the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MatrixError(f"matrix file not found: {path}; ablations/default.yaml is an "
                          f"example") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MatrixError(f"cannot read matrix file {path}: {error}") from None
    data = load_yaml(text, str(path))
    matrix = parse_matrix(data, source=str(path), text=text)
    logger.debug("loaded matrix %s from %s", matrix.name, path)
    return matrix


def parse_matrix(data: Mapping, *, source: str | None = None, text: str = "") -> Matrix:
    """Validate parsed matrix YAML and build the Matrix.

    Args:
        data: the parsed YAML document.
        source: the file path for messages and for ``Matrix.source``.
        text: the YAML text, stored in ``Matrix.text``.

    Raises:
        MatrixError: the first problem found, naming ``source`` and the key path.
    """
    checker = SectionChecker(source or "matrix")
    if data is None:
        raise checker.error("", "the matrix is empty; it needs at least a name and factors")
    if not isinstance(data, Mapping):
        keys = ", ".join(TOP_LEVEL_KEYS)
        raise checker.error("", f"the matrix must be a mapping with the keys {keys}, got {describe(data)}")
    checker.check_keys(data, TOP_LEVEL_KEYS, "", "top-level key")

    name = checker.parse_name(data)
    dataset = checker.parse_dataset(data.get("dataset", DEFAULT_DATASET))
    seeds = checker.parse_seeds(data.get("seeds", DEFAULT_SEEDS))
    train = checker.parse_train(data.get("train"))
    factors, bundles = checker.parse_factors(data.get("factors"))
    exclude = checker.parse_exclude(data.get("exclude"), factors, bundles)
    criteria = checker.parse_criteria(data.get("criteria"))

    matrix = Matrix(
        name=name,
        dataset=dataset,
        seeds=seeds,
        train=train,
        factors=MappingProxyType(factors),
        exclude=exclude,
        criteria=criteria,
        source=source,
        text=text,
        bundles=MappingProxyType(bundles),
    )
    for setting in data.get("train") or {}:  # the settings the file gives, not defaults
        if setting in matrix.factors and setting not in matrix.bundles:
            logger.warning("%s: train.%s %s is not used, because factor %r sets %s in every "
                           "cell", checker.label, setting, data["train"][setting], setting,
                           setting)
    _check_cells(matrix, checker)
    return matrix


def apply_overrides(matrix: Matrix, overrides: list[str]) -> Matrix:
    """Return ``matrix`` with train settings replaced by "key=value" strings.

    Each key is a Settings field, optionally written ``train.lr``. The value is read as
    a YAML scalar and checked like the same key in the file. A setting that a factor
    varies cannot be overridden, because the factor would take precedence.

    Raises:
        MatrixError: an override is malformed, unknown, invalid, set by a factor, or
            makes a cell invalid.
    """
    changes: dict[str, Any] = {}
    for item in overrides:
        checker = SectionChecker(f"--set {item}", matrix.dataset)
        key, separator, raw_value = item.partition("=")
        if not separator:
            raise checker.error("", "expected KEY=VALUE, for example lr=0.001")
        name = key.strip().removeprefix("train.")
        if name not in SETTING_NAMES:
            raise checker.error(
                "",
                f"unknown setting {name!r}; settings: {', '.join(SETTING_NAMES)}"
                f"{suggest(name, SETTING_NAMES)}",
            )
        setter = _factor_setting(matrix, name)
        if setter is not None:
            raise checker.error(
                "",
                f"{name} is set by factor {setter!r}, which takes precedence over train; "
                "change the factor's levels in the matrix file instead",
            )
        value = load_yaml(raw_value, f"--set {item}")
        changes[name] = checker.parse_setting(name, value, f"train.{name}")

    if not changes:
        return matrix
    checker = SectionChecker("--set " + " ".join(overrides), matrix.dataset)
    try:
        train = replace(matrix.train, **changes)
    except ValueError as error:
        raise checker.error("train", str(error)) from None
    overridden = replace(matrix, train=train)
    _check_cells(overridden, checker)
    return overridden


def _factor_setting(matrix: Matrix, name: str) -> str | None:
    """Return the factor that sets setting ``name``, or None if no factor sets it."""
    if name in matrix.factors:
        return name
    for factor, bundles in matrix.bundles.items():
        if any(name in settings for settings in bundles.values()):
            return factor
    return None


def _combinations(factors: Mapping[str, tuple]) -> list[dict[str, Any]]:
    """Return every factor -> level map of the full product, first factor slowest."""
    names = list(factors)
    return [dict(zip(names, combination)) for combination in itertools.product(*factors.values())]


def _matches(rule: Mapping[str, Any], levels: Mapping[str, Any]) -> bool:
    return all(same_level(levels[factor], level) for factor, level in rule.items())


def _cell_id(levels: Mapping[str, Any]) -> str:
    if not levels:
        return BASE_CELL_ID
    return ",".join(f"{factor}={format_level(level)}" for factor, level in levels.items())


def _make_cell(matrix: Matrix, index: int, levels: dict[str, Any]) -> Cell:
    """Build a cell. Raises ValueError if its settings contradict each other."""
    changes: dict[str, Any] = {}
    for factor, level in levels.items():
        if factor in matrix.bundles:
            changes.update(matrix.bundles[factor][level])
        else:
            changes[factor] = level
    return Cell(
        index=index,
        cell_id=_cell_id(levels),
        levels=MappingProxyType(levels),
        settings=replace(matrix.train, **changes),
    )



def _check_cells(matrix: Matrix, checker: SectionChecker) -> None:
    """Reject exclusions that drop no cell or every cell, and cells with contradicting settings.

    Each exclusion names existing levels, so it matches some cell of the full product. It
    drops no cell only when earlier exclusions already drop every cell that it matches.
    """
    product = math.prod(len(levels) for levels in matrix.factors.values())
    if product * len(matrix.seeds) > MAX_RUNS:
        raise checker.error("factors", f"the factors expand to {product:,} cells x "
                            f"{len(matrix.seeds)} seeds = {product * len(matrix.seeds):,} runs; "
                            f"the limit is {MAX_RUNS:,}; split the matrix into several files")
    combinations = _combinations(matrix.factors)
    dropped = [0] * len(matrix.exclude)
    kept = []
    for levels in combinations:
        matching = [index for index, rule in enumerate(matrix.exclude) if _matches(rule, levels)]
        if matching:
            dropped[matching[0]] += 1
        else:
            kept.append(levels)

    for index, count in enumerate(dropped):
        if count == 0:
            raise checker.error(
                f"exclude[{index}]",
                "drops no cell, because earlier entries of exclude already drop every cell "
                "that it matches; remove it",
            )
    if not kept:
        raise checker.error("exclude", f"drops all {len(combinations)} cells, so no cell is left to run")

    cell_of_settings: dict[Settings, str] = {}
    oversized = []
    for index, levels in enumerate(kept):
        try:
            cell = _make_cell(matrix, index, levels)
        except ValueError as error:
            raise checker.error(
                f"cell {_cell_id(levels)!r}",
                f"{error}; exclude this cell, or vary these settings together in a bundle factor",
            ) from None
        # Two cells that train the same settings would be the same runs twice.
        twin = cell_of_settings.setdefault(cell.settings, cell.cell_id)
        if twin != cell.cell_id:
            raise checker.error(
                f"cell {cell.cell_id!r}",
                f"trains the same settings as cell {twin!r}; give the bundles or levels "
                "that differ only in name different settings, or remove one",
            )
        subset = cell.settings.train_subset
        if subset is not None and cell.settings.batch_size > subset:
            oversized.append(cell.cell_id)
    if oversized:
        logger.warning("%s: batch_size is larger than train_subset in %d of %d cells, so "
                       "each of their epochs is one step over the whole subset; first: %s",
                       checker.label, len(oversized), len(kept), oversized[0])
