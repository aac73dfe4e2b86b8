"""Thresholds files for ``mnistbench check``: parse them and match their selectors to cells.

    thresholds = load_thresholds(Path("ablations/thresholds.yaml"))
    matched = match_rules(thresholds, factors, cells, "smoke")  # rule key -> cell ids

The file format is described in :mod:`mnistbench.check`. Every problem raises
CheckInputError naming the file, the key path (``rules[1].select.activation``), the
value found and the allowed values, with a suggestion where one is close. Selectors
are checked against the store: an unknown factor, level or cell id is an error, and
so is a selector that matches no cell, so a rule never passes without checking anything.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mnistbench.baseline import CellRuns
from mnistbench.errors import CheckInputError
from mnistbench.matrix import format_level
from mnistbench.matrix_checks import describe_yaml_error
from mnistbench.settings import describe, suggest

logger = logging.getLogger(__name__)

THRESHOLD_KEYS = ("min_median_accuracy", "min_convergence_rate", "max_collapse_rate")
RULE_KEYS = ("select", *THRESHOLD_KEYS)
TOP_LEVEL_KEYS = ("ablation", "tolerance", "rules")
TOLERANCE_KEYS = ("accuracy", "convergence_rate")
ALL_CELLS = "all"  # `select: all` selects every cell, as `select: {}` does
CELL_KEY = "cell"  # `select: {cell: ID}` selects one cell by its id
LISTED_CELLS = 10  # cell ids listed in a message before the rest are counted


@dataclass(frozen=True)
class Tolerance:
    """Drops against the baseline that never count as regressions, as fractions."""

    # Mean final test accuracy: one point, 100 of the 10,000 MNIST test images.
    accuracy: float = 0.01
    # Convergence rate: one run in ten.
    convergence_rate: float = 0.10


@dataclass(frozen=True)
class Rule:
    """One entry of ``rules``: which cells it selects and the thresholds it sets."""

    key: str  # key path in the file, as in "rules[1]"
    select: Mapping[str, tuple[Any, ...]]  # factor -> accepted levels as written; empty: every cell
    cell_id: str | None  # set instead of ``select`` when the rule names one cell
    limits: Mapping[str, float | None]  # threshold key -> value; None removes an earlier value


@dataclass(frozen=True)
class Thresholds:
    """A validated thresholds file."""

    source: str  # path of the file, for messages
    ablation: str | None  # the ablation that the file is written for, if it names one
    tolerance: Tolerance
    rules: tuple[Rule, ...]


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a duplicated key is an error and ``1e-3`` is a float."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicated key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 reads a number with an exponent but no dot as a float; YAML 1.1 as a string.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_thresholds(path: Path) -> Thresholds:
    """Read and validate a thresholds file.

    Raises:
        CheckInputError: the file cannot be read, is not valid YAML, or is not a
            valid thresholds file. The message names the file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckInputError(f"thresholds file not found: {path}; ablations/thresholds.yaml "
                              f"is an example") from None
    except IsADirectoryError:
        raise CheckInputError(f"thresholds file {path} is a directory; expected a YAML file "
                              f"such as ablations/thresholds.yaml") from None
    except OSError as error:
        raise CheckInputError(f"cannot read thresholds file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise CheckInputError(f"cannot read thresholds file {path}: {error}; expected UTF-8 "
                              f"text") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader subclass
    except yaml.YAMLError as error:
        raise CheckInputError(f"{path}: {describe_yaml_error(error)}") from None
    return parse_thresholds(data, str(path))


def parse_thresholds(data: Any, source: str) -> Thresholds:
    """Validate a parsed thresholds document and build the Thresholds.

    Raises:
        CheckInputError: the first problem found, naming ``source`` and the key path.
    """
    if not isinstance(data, Mapping):
        raise _error(source, "", f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, "
                                 f"found {describe(data)}")
    _check_keys(source, "", data, TOP_LEVEL_KEYS, "top-level key")

    ablation = data.get("ablation")
    if ablation is not None and not isinstance(ablation, str):
        raise _error(source, "ablation", f"expected an ablation name, found {describe(ablation)}")

    tolerance_data = data.get("tolerance", {})
    if not isinstance(tolerance_data, Mapping):
        raise _error(source, "tolerance", f"expected a mapping with keys "
                     f"{', '.join(TOLERANCE_KEYS)}, found {describe(tolerance_data)}")
    _check_keys(source, "tolerance", tolerance_data, TOLERANCE_KEYS, "tolerance")
    tolerance = Tolerance(**{key: _fraction(source, f"tolerance.{key}", value)
                             for key, value in tolerance_data.items()})

    rules_data = data.get("rules", [])
    if not isinstance(rules_data, list):
        raise _error(source, "rules", f"expected a list of rules, found {describe(rules_data)}")
    rules = tuple(_parse_rule(source, f"rules[{i}]", item) for i, item in enumerate(rules_data))
    return Thresholds(source, ablation, tolerance, rules)


def match_rules(thresholds: Thresholds, factors: Mapping[str, Sequence[str]],
                cells: Sequence[CellRuns], ablation: str) -> dict[str, frozenset[str]]:
    """Return the ids of the cells that each rule selects, keyed by the rule's key path.

    Args:
        factors: factor -> level texts of the ablation, as the store keeps them.
        cells: the ablation's cells.
        ablation: the ablation's name, for messages.

    Raises:
        CheckInputError: a selector names an unknown factor, level or cell id, or
            matches no cell.
    """
    source = thresholds.source
    ids = [cell.cell_id for cell in cells]
    matched = {}
    for rule in thresholds.rules:
        if rule.cell_id is not None:
            if rule.cell_id not in ids:
                raise _error(source, f"{rule.key}.select.{CELL_KEY}", (
                    f"cell {rule.cell_id!r} not found in ablation '{ablation}'; cells: "
                    f"{_listing(ids)}{_closest(rule.cell_id, ids)}"))
            matched[rule.key] = frozenset([rule.cell_id])
            continue

        accepted = {factor: _accepted_levels(source, f"{rule.key}.select.{factor}", factor,
                                             levels, factors)
                    for factor, levels in rule.select.items()}
        selected = frozenset(cell.cell_id for cell in cells
                             if all(cell.levels[f] in texts for f, texts in accepted.items()))
        if not selected:
            written = ", ".join(f"{f}: {'/'.join(sorted(t))}" for f, t in accepted.items())
            raise _error(source, f"{rule.key}.select", (
                f"selector {{{written}}} matches no cell of ablation '{ablation}', so its "
                f"thresholds would check nothing (the matrix excludes that combination or "
                f"the store holds another ablation); cells: {_listing(ids)}"))
        matched[rule.key] = selected
    return matched


def _parse_rule(source: str, key: str, item: Any) -> Rule:
    if not isinstance(item, Mapping):
        raise _error(source, key, f"expected a mapping with keys {', '.join(RULE_KEYS)}, "
                                  f"found {describe(item)}")
    _check_keys(source, key, item, RULE_KEYS, "rule key")
    if "select" not in item:
        raise _error(source, f"{key}.select", f"missing; write 'select: {ALL_CELLS}' for every "
                     f"cell or a mapping of factor to level")
    limits = {name: _fraction(source, f"{key}.{name}", item[name], nullable=True)
              for name in THRESHOLD_KEYS if name in item}
    if not limits:
        raise _error(source, key, f"the rule sets no threshold; set at least one of "
                                  f"{', '.join(THRESHOLD_KEYS)}")

    select = item["select"]
    if select == ALL_CELLS or select == {}:
        return Rule(key, {}, None, limits)
    if not isinstance(select, Mapping):
        raise _error(source, f"{key}.select", (
            f"expected '{ALL_CELLS}', {{}} or a mapping of factor to level, such as "
            f"{{activation: relu}} or {{{CELL_KEY}: \"activation=relu,width=100\"}}, "
            f"found {describe(select)}"))
    if CELL_KEY in select:
        cell_id = select[CELL_KEY]
        if len(select) > 1:
            raise _error(source, f"{key}.select", f"'{CELL_KEY}' selects one cell by id and "
                         f"cannot be combined with factors; found {dict(select)!r}")
        if not isinstance(cell_id, str):
            raise _error(source, f"{key}.select.{CELL_KEY}",
                         f"expected a cell id string, found {describe(cell_id)}")
        return Rule(key, {}, cell_id, limits)

    levels = {}
    for factor, level in select.items():
        listed = tuple(level) if isinstance(level, list) else (level,)
        if not listed or any(isinstance(v, (Mapping, list)) for v in listed):
            raise _error(source, f"{key}.select.{factor}", f"expected a level or a non-empty "
                         f"list of levels, found {describe(level)}")
        levels[str(factor)] = listed
    return Rule(key, levels, None, limits)


def _accepted_levels(source: str, key: str, factor: str, levels: tuple[Any, ...],
                     factors: Mapping[str, Sequence[str]]) -> frozenset[str]:
    """Return the stored level texts that match the levels written in a selector."""
    if factor not in factors:
        raise _error(source, key, f"unknown factor {factor!r}; factors of the ablation: "
                     f"{', '.join(factors) or 'none'}{suggest(factor, factors)}")
    known = factors[factor]
    accepted = set()
    for level in levels:
        texts = _level_texts(level) & set(known)
        if not texts:
            raise _error(source, key, (
                f"unknown level {describe(level)} of factor {factor!r}; levels: "
                f"{', '.join(known)}{suggest(format_level(level), known)}"))
        accepted |= texts
    return frozenset(accepted)


def _level_texts(level: Any) -> set[str]:
    """Return the stored texts that a level written in a selector matches.

    ``0.5`` and ``"0.5"`` both give "0.5", ``1e-3`` gives "0.001", and an integral
    number gives both forms ("100" and "100.0") because a matrix may store either.
    """
    texts = {format_level(level)}
    number = level
    if isinstance(level, str):
        try:
            number = float(level)
        except ValueError:
            return texts
    if isinstance(number, (int, float)) and not isinstance(number, bool):
        texts.add(format_level(float(number)))
        if float(number).is_integer():
            texts.add(format_level(int(number)))
    return texts


def _fraction(source: str, key: str, value: Any, *, nullable: bool = False) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        allowed = "a number in [0, 1]" + (", or null to remove the threshold" if nullable else "")
        raise _error(source, key, f"expected {allowed}, found {describe(value)}")
    return float(value)


def _check_keys(source: str, key: str, data: Mapping, allowed: Sequence[str], kind: str) -> None:
    for name in data:
        if name not in allowed:
            path = f"{key}.{name}" if key else str(name)
            raise _error(source, path, f"unknown {kind} {name!r}; allowed: "
                                       f"{', '.join(allowed)}{suggest(name, allowed)}")


def _closest(word: str, candidates: Sequence[str]) -> str:
    """Return "; did you mean 'x'?" with a looser cutoff than ``suggest``, for long cell ids."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def _listing(ids: Sequence[str]) -> str:
    listed = ", ".join(ids[:LISTED_CELLS])
    return listed if len(ids) <= LISTED_CELLS else f"{listed} and {len(ids) - LISTED_CELLS} more"


def _error(source: str, key: str, message: str) -> CheckInputError:
    return CheckInputError(f"{source}: {key}: {message}" if key else f"{source}: {message}")
