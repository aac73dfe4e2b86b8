"""Read matrix YAML and check each section of a matrix file. :mod:`mnistbench.matrix`
builds the Matrix from the checked sections::

    checker = SectionChecker("ablations/x.yaml")
    checker.parse_seeds(5)       # (0, 1, 2, 3, 4)
    checker.parse_seeds([0, 0])  # MatrixError: ablations/x.yaml: seeds[1]: duplicate seed 0; ...

A MatrixError message reads "FILE: KEY PATH: problem". The key path looks like
``factors.activation[2]``, and the problem gives the value found, the allowed values and,
where one is close, a suggestion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import yaml

from mnistbench.errors import MatrixError
from mnistbench.settings import (
    CRITERIA_NAMES,
    CRITERIA_RANGES,
    SETTING_NAMES,
    Criteria,
    Range,
    Settings,
    describe,
    format_level,
    parse_float,
    parse_int,
    same_level,
    suggest,
    validate_setting,
)

# Number of training examples of each dataset known by name. A dataset given as a
# directory path has no entry, so its train_subset has no upper bound here.
TRAIN_SIZES: dict[str, int] = {"mnist": 60_000, "fashion-mnist": 60_000}
# A seed is stored as an SQLite INTEGER, a signed 64-bit number.
SEED_RANGE = Range(low=0, high=2**63 - 1, high_inclusive=True)
TOP_LEVEL_KEYS = ("name", "dataset", "seeds", "train", "factors", "exclude", "criteria")
# More seeds than this is almost surely a typo; the bound keeps expansion cheap to check.
SEED_COUNT = Range(low=1, high=10_000, high_inclusive=True)
# Names of matrices, bundle factors and bundles. They appear in cell ids and file
# names, so "=", "," and "/" are excluded.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
NAME_RULE = "letters, digits, '_', '.' and '-'"


class MatrixLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with duplicate keys rejected and YAML 1.2 exponent floats."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 needs a dot in a float, so PyYAML reads 1e-3 as a string. This resolver adds
# the YAML 1.2 forms that have an exponent and no dot. add_implicit_resolver copies the
# resolver table first, so yaml.SafeLoader itself is unchanged.
MatrixLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, label: str) -> Any:
    """Parse YAML text with :class:`MatrixLoader`.

    Raises:
        MatrixError: a syntax error or duplicate key, with ``label``, line and column.
    """
    try:
        return yaml.load(text, Loader=MatrixLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise MatrixError(f"{label}: {describe_yaml_error(error)}") from None


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """Describe a YAML error on one line: "invalid YAML at line L, column C: problem"."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"invalid YAML{where}: {error.problem or error.context}"
    return f"invalid YAML: {error}"


def join_path(path: str, key: Any) -> str:
    """Append a mapping key to a key path: join_path("train", "lr") -> "train.lr"."""
    return f"{path}.{key}" if path else str(key)


class SectionChecker:
    """Checker for the sections of one matrix file or of --set overrides.

    Each method checks one section, returns it normalized, and raises MatrixError.
    """

    def __init__(self, label: str, dataset: str | None = None) -> None:
        self.label = label  # the file path or the --set option that messages start with
        self.train_size = TRAIN_SIZES.get(dataset) if dataset else None

    def error(self, path: str, message: str) -> MatrixError:
        """Build the MatrixError for a problem at key path ``path`` ("" for the whole file)."""
        if path:
            return MatrixError(f"{self.label}: {path}: {message}")
        return MatrixError(f"{self.label}: {message}")

    def check_keys(self, data: Mapping, known: tuple[str, ...], path: str, kind: str) -> None:
        """Reject a key of ``data`` that is not in ``known``, suggesting the closest one."""
        for key in data:
            if key not in known:
                raise self.error(
                    join_path(path, key),
                    f"unknown {kind} {key!r}; expected one of {', '.join(known)}"
                    f"{suggest(key, known)}",
                )

    def section(self, value: Any, path: str, expected: str) -> Mapping:
        """Return an optional mapping section, with a missing or null section as {}."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(path, f"must be {expected}, got {describe(value)}")
        return value

    def parse_setting(self, name: str, value: Any, path: str) -> Any:
        """Check and normalize one setting's value, with train_subset limited by the dataset."""
        try:
            value = validate_setting(name, value)
        except ValueError as error:
            raise self.error(path, str(error)) from None
        limited = name == "train_subset" and value is not None and self.train_size is not None
        if limited and value > self.train_size:
            raise self.error(
                path,
                f"must be at most {self.train_size}, the training set size of this dataset, "
                f"got {value}",
            )
        return value

    def parse_settings(self, data: Mapping, path: str) -> dict[str, Any]:
        """Check a mapping of setting -> value: the train section or one bundle."""
        self.check_keys(data, SETTING_NAMES, path, "setting")
        return {name: self.parse_setting(name, value, join_path(path, name)) for name, value in data.items()}

    def parse_name(self, data: Mapping) -> str:
        if "name" not in data:
            raise self.error("name", "missing; every matrix needs a name, for example `name: default`")
        name = data["name"]
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise self.error("name", f"must be a non-empty string of {NAME_RULE}, got {describe(name)}")
        return name

    def parse_dataset(self, dataset: Any) -> str:
        """Check the dataset, and limit train_subset by its size from here on."""
        known = " or ".join(TRAIN_SIZES)
        if not isinstance(dataset, str) or not dataset:
            raise self.error("dataset", f"must be {known} or a directory path, got {describe(dataset)}")
        if dataset not in TRAIN_SIZES and "/" not in dataset:
            raise self.error(
                "dataset",
                f"unknown dataset {dataset!r}; expected {known}, or a directory path containing "
                f"'/' such as ./{dataset}{suggest(dataset, TRAIN_SIZES)}",
            )
        self.train_size = TRAIN_SIZES.get(dataset)
        return dataset

    def parse_seeds(self, seeds: Any) -> tuple[int, ...]:
        """Return the seeds of a count n (0..n-1) or of a list of distinct ints >= 0."""
        if not isinstance(seeds, list):
            try:
                count = parse_int(seeds, SEED_COUNT)
            except ValueError as error:
                raise self.error("seeds", f"must be a count or a list of seeds; a count {error}") from None
            return tuple(range(count))

        if not seeds:
            raise self.error("seeds", "the list is empty; give at least one seed")
        if len(seeds) not in SEED_COUNT:
            raise self.error("seeds", f"lists {len(seeds)} seeds; the count must be {SEED_COUNT}")
        parsed: list[int] = []
        for index, seed in enumerate(seeds):
            try:
                seed = parse_int(seed, SEED_RANGE)
            except ValueError as error:
                raise self.error(f"seeds[{index}]", str(error)) from None
            if seed in parsed:
                raise self.error(f"seeds[{index}]", f"duplicate seed {seed}; seeds must be distinct")
            parsed.append(seed)
        return tuple(parsed)

    def parse_train(self, data: Any) -> Settings:
        values = self.parse_settings(self.section(data, "train", "a mapping of settings"), "train")
        try:
            return Settings(**values)
        except ValueError as error:
            raise self.error("train", str(error)) from None

    def parse_factors(self, data: Any) -> tuple[dict[str, tuple], dict[str, Mapping]]:
        """Return factor -> levels and bundle factor -> bundle name -> settings."""
        factors: dict[str, tuple] = {}
        bundles: dict[str, Mapping] = {}
        for name, spec in self.section(data, "factors", "a mapping of factor -> levels").items():
            path = join_path("factors", name)
            if name in SETTING_NAMES:
                factors[name] = self.parse_levels(name, spec, path)
            elif isinstance(spec, Mapping):
                bundles[name] = self.parse_bundles(name, spec, path)
                factors[name] = tuple(bundles[name])
            else:
                raise self.error(
                    path,
                    f"unknown factor {name!r}; a factor is a setting ({', '.join(SETTING_NAMES)}) "
                    f"with a list of levels, or a bundle factor with a mapping of bundles"
                    f"{suggest(name, SETTING_NAMES)}",
                )
        self.check_overlap(factors, bundles)
        return factors, bundles

    def parse_levels(self, name: str, spec: Any, path: str) -> tuple:
        if isinstance(spec, Mapping):
            raise self.error(
                path,
                f"{name} is a setting, so its levels must be a list, got a mapping; "
                "a bundle factor needs a name that is not a setting",
            )
        if not isinstance(spec, list):
            raise self.error(
                path, f"levels must be a list, got {describe(spec)}; write [value] for one level"
            )
        if not spec:
            raise self.error(path, "the level list is empty; give at least one level")

        levels: list = []
        for index, level in enumerate(spec):
            level = self.parse_setting(name, level, f"{path}[{index}]")
            for earlier, seen in enumerate(levels):
                if same_level(seen, level):
                    raise self.error(
                        f"{path}[{index}]",
                        f"duplicate level {format_level(level)}, already at {path}[{earlier}]",
                    )
            levels.append(level)
        return tuple(levels)

    def parse_bundles(self, name: str, spec: Mapping, path: str) -> Mapping:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise self.error(
                path, f"a bundle factor's name must contain only {NAME_RULE}, got {describe(name)}"
            )
        if not spec:
            raise self.error(
                path, "the bundle factor has no bundles; give at least one, for example `base: {}`"
            )

        bundles = {}
        for bundle, settings in spec.items():
            bundle_path = join_path(path, bundle)
            if not isinstance(bundle, str) or not NAME_PATTERN.fullmatch(bundle):
                raise self.error(
                    bundle_path, f"a bundle name must contain only {NAME_RULE}, got {describe(bundle)}"
                )
            settings = self.section(
                settings, bundle_path, "a mapping of setting -> value, or {} for the base settings"
            )
            bundles[bundle] = MappingProxyType(self.parse_settings(settings, bundle_path))
        return MappingProxyType(bundles)

    def check_overlap(self, factors: Mapping[str, tuple], bundles: Mapping[str, Mapping]) -> None:
        """Reject a setting that two factors set, because neither could take precedence."""
        setters = {name: name for name in factors if name not in bundles}
        for factor, factor_bundles in bundles.items():
            for bundle, settings in factor_bundles.items():
                for setting in settings:
                    other = setters.setdefault(setting, factor)
                    if other != factor:
                        raise self.error(
                            f"factors.{factor}.{bundle}.{setting}",
                            f"factor {other!r} also sets {setting}, and only one factor may set a "
                            f"setting; remove {setting} from this bundle or from factor {other!r}",
                        )

    def parse_exclude(self, data: Any, factors: Mapping[str, tuple], bundles: Mapping) -> tuple[Mapping, ...]:
        """Return the exclusions as factor -> level maps with levels normalized like the factors'."""
        if data is None:
            return ()
        if not isinstance(data, list):
            raise self.error("exclude", f"must be a list of factor -> level mappings, got {describe(data)}")

        rules = []
        for index, rule in enumerate(data):
            path = f"exclude[{index}]"
            if not isinstance(rule, Mapping) or not rule:
                raise self.error(path, f"must be a non-empty mapping of factor -> level, got {describe(rule)}")
            parsed = {}
            for factor, level in rule.items():
                level_path = join_path(path, factor)
                parsed[factor] = self.parse_excluded_level(factor, level, level_path, factors, bundles)
            rules.append(MappingProxyType(parsed))
        return tuple(rules)

    def parse_excluded_level(
        self, factor: Any, level: Any, path: str, factors: Mapping[str, tuple], bundles: Mapping
    ) -> Any:
        if factor not in factors:
            names = ", ".join(factors) or "none"
            raise self.error(
                path,
                f"unknown factor {factor!r}; factors of this matrix: {names}{suggest(factor, factors)}",
            )
        if factor not in bundles:
            level = self.parse_setting(factor, level, path)
        if not any(same_level(level, known) for known in factors[factor]):
            level_names = [format_level(known) for known in factors[factor]]
            raise self.error(
                path,
                f"{format_level(level)} is not a level of factor {factor}; "
                f"levels: {', '.join(level_names)}{suggest(level, level_names)}",
            )
        return level

    def parse_criteria(self, data: Any) -> Criteria:
        values = self.section(data, "criteria", "a mapping of criterion -> fraction")
        self.check_keys(values, CRITERIA_NAMES, "criteria", "criterion")
        parsed = {}
        for name, value in values.items():
            try:
                parsed[name] = parse_float(value, CRITERIA_RANGES[name])
            except ValueError as error:
                message = f"{error}; a criterion is a fraction such as 0.9"
                raise self.error(f"criteria.{name}", message) from None
        return Criteria(**parsed)
