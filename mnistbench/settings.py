"""Training settings and outcome criteria, and the checks on each setting's value.

A :class:`Settings` contains everything that determines a run except its seed. A matrix
file sets the base settings in its ``train`` section and may vary any field as a factor.
:class:`Criteria` contains the thresholds that classify a run's outcome::

    settings = Settings(activation="relu", conv=True, pool=True)
    settings.input_features()         # 391
    validate_setting("dropout", 1.0)  # raises ValueError: must be in [0, 1), got 1.0 (number)

Checking a value also normalizes it: an int given for a float field becomes a float, and
an integral float given for an int field (``100.0``, ``6e4``) becomes an int. A bool is
never accepted as a number, although Python treats it as an int.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

IMAGE_FEATURES = 784  # a 28 x 28 MNIST image, flattened
CONV_KERNEL = 3  # Conv1d(1, 1, 3) without padding returns IMAGE_FEATURES - 2 features

# Allowed values of the categorical settings.
CHOICES: dict[str, tuple[str, ...]] = {
    "activation": ("relu", "sigmoid", "tanh", "gelu"),
    "init": ("default", "uniform", "xavier", "kaiming", "large_normal"),
    "loss": ("cross_entropy", "mse"),
    "optimizer": ("sgd", "adam"),
    "precision": ("float32", "tf32", "bf16"),
}
BOOL_SETTINGS = frozenset({"conv", "pool"})
FLOAT_SETTINGS = frozenset({"dropout", "lr", "momentum", "weight_decay"})
INT_SETTINGS = frozenset({"width", "batch_size", "epochs", "train_subset"})
OPTIONAL_SETTINGS = frozenset({"train_subset"})  # settings that may be None (null in YAML)


@dataclass(frozen=True)
class Range:
    """Interval of allowed values for a numeric setting. A bound of None leaves that side open."""

    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None:
            if value < self.low or (value == self.low and not self.low_inclusive):
                return False
        if self.high is not None:
            if value > self.high or (value == self.high and not self.high_inclusive):
                return False
        return True

    def __str__(self) -> str:
        """Describe the interval as ``in [0, 1)``, ``> 0`` or ``>= 1``."""
        if self.low is not None and self.high is not None:
            left = "[" if self.low_inclusive else "("
            right = "]" if self.high_inclusive else ")"
            return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"
        if self.low is not None:
            return f"{'>=' if self.low_inclusive else '>'} {_number(self.low)}"
        if self.high is not None:
            return f"{'<=' if self.high_inclusive else '<'} {_number(self.high)}"
        return "any number"


RANGES: dict[str, Range] = {
    "dropout": Range(low=0, high=1),
    "lr": Range(low=0, low_inclusive=False),
    "momentum": Range(low=0, high=1),
    "weight_decay": Range(low=0),
    # Upper bounds catch typos (an extra zero or three) before they allocate gigabytes:
    # a width of 16,384 already makes one run's first layer 51 MB.
    "width": Range(low=1, high=16_384, high_inclusive=True),
    "batch_size": Range(low=1, high=65_536, high_inclusive=True),
    "epochs": Range(low=1, high=10_000, high_inclusive=True),
    "train_subset": Range(low=1),
}


@dataclass(frozen=True)
class Settings:
    """Everything that determines one run except its seed. Every field may be a factor.

    Construction checks and normalizes every field (see :func:`validate_setting`) and
    raises ValueError for an invalid value or for momentum with the adam optimizer.
    """

    # Model.
    # Hidden-layer activation: relu | sigmoid | tanh | gelu.
    activation: str = "sigmoid"
    # Weight initialization: default (PyTorch's own Linear/Conv1d init) | uniform
    # (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases) | xavier (xavier_uniform
    # weights, zero bias) | kaiming (kaiming_normal, fan_in, relu gain, zero bias) |
    # large_normal (N(0, 1) weights, a setting that is expected to fail).
    init: str = "default"
    # Conv1d(1, 1, 3) front on the flattened 784-pixel image (782 outputs), followed by
    # the activation.
    conv: bool = False
    # max_pool1d(2) before the first Linear, on the conv output, or on the raw 784
    # features when conv is off.
    pool: bool = False
    # Probability in [0, 1) of zeroing a hidden unit during training.
    dropout: float = 0.0
    # Number of hidden units.
    width: int = 100

    # Training.
    # Loss: cross_entropy | mse (mean squared error against one-hot targets).
    loss: str = "cross_entropy"
    # Optimizer: sgd | adam.
    optimizer: str = "sgd"
    # Learning rate, > 0.
    lr: float = 0.1
    # SGD momentum in [0, 1). It must be 0 with adam, which has its own moment estimates.
    momentum: float = 0.0
    # L2 penalty coefficient, >= 0.
    weight_decay: float = 0.0
    # Examples per optimizer step, >= 1.
    batch_size: int = 128
    # Passes over the training subset, >= 1.
    epochs: int = 3
    # Number of training examples used, or None for the whole training set. The matrix
    # file check limits it to the dataset size (60000 for MNIST and Fashion-MNIST).
    train_subset: int | None = None
    # Numeric precision: float32 | tf32 | bf16. tf32 and bf16 take effect only on CUDA.
    precision: str = "float32"

    def __post_init__(self) -> None:
        for field in fields(self):
            try:
                value = validate_setting(field.name, getattr(self, field.name))
            except ValueError as error:
                raise ValueError(f"Settings.{field.name} {error}") from None
            object.__setattr__(self, field.name, value)
        check_combination(self)

    def input_features(self) -> int:
        """Return the number of features entering the first Linear layer.

        784 for the raw image, 782 after the conv front, and half of either (rounded
        down: 392 or 391) with pooling.
        """
        features = IMAGE_FEATURES - (CONV_KERNEL - 1) if self.conv else IMAGE_FEATURES
        if self.pool:
            features //= 2
        return features

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a plain JSON-compatible dict in field order."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


SETTING_NAMES: tuple[str, ...] = tuple(field.name for field in fields(Settings))


# Allowed interval of each criterion: a fraction in (0, 1]. With 10 classes the most
# predicted class always takes at least a tenth of the predictions, so a collapse
# share of 0.1 or less would count every run as collapsed.
SHARE = Range(low=0, low_inclusive=False, high=1, high_inclusive=True)
CRITERIA_RANGES = {
    "convergence_accuracy": SHARE,
    "collapse_share": Range(low=0.1, low_inclusive=False, high=1, high_inclusive=True),
}


@dataclass(frozen=True)
class Criteria:
    """Thresholds that classify a finished run's outcome, as fractions in (0, 1]."""

    # Final test accuracy at or above which a run counts as converged.
    convergence_accuracy: float = 0.90
    # Share of final test predictions in the most predicted class at or above which a
    # run counts as collapsed.
    collapse_share: float = 0.90

    def __post_init__(self) -> None:
        for field in fields(self):
            try:
                value = parse_float(getattr(self, field.name), CRITERIA_RANGES[field.name])
            except ValueError as error:
                raise ValueError(f"Criteria.{field.name} {error}") from None
            object.__setattr__(self, field.name, value)


CRITERIA_NAMES: tuple[str, ...] = tuple(field.name for field in fields(Criteria))


def format_level(value: Any) -> str:
    """Format a level for a cell id: True -> "true", 0.5 -> "0.5", None -> "none", 100 -> "100"."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def same_level(first: Any, second: Any) -> bool:
    """Compare two normalized values without treating True as equal to 1."""
    return type(first) is type(second) and first == second


def check_combination(settings: Settings) -> None:
    """Raise ValueError if two settings that are valid on their own contradict each other."""
    if settings.optimizer == "adam" and settings.momentum != 0:
        raise ValueError(
            f"momentum must be 0 with optimizer adam, got {_number(settings.momentum)}; "
            "momentum applies to sgd only"
        )


def validate_setting(name: str, value: Any) -> Any:
    """Check one setting's value and return it normalized to the field's type.

    Args:
        name: a Settings field name.
        value: the value as read from YAML or given in code.

    Returns:
        The value as str, bool, float, int or None, following the field's type.

    Raises:
        ValueError: the value has the wrong type or is out of range. The message starts
            with "must be" and does not name the setting, so callers can prefix a location.
        KeyError: ``name`` is not a Settings field (a programming error).
    """
    if name not in SETTING_NAMES:
        raise KeyError(f"no setting named {name!r}; settings: {', '.join(SETTING_NAMES)}")
    if value is None and name in OPTIONAL_SETTINGS:
        return None
    if name in CHOICES:
        return parse_choice(value, CHOICES[name])
    if name in BOOL_SETTINGS:
        return parse_bool(value)
    if name in FLOAT_SETTINGS:
        return parse_float(value, RANGES[name])
    if name in INT_SETTINGS:
        return parse_int(value, RANGES[name])
    raise AssertionError(f"setting {name!r} has no type rule; add it to one of the tables")


def parse_choice(value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError with a suggestion."""
    choices = tuple(choices)
    allowed = ", ".join(choices)
    if not isinstance(value, str):
        raise ValueError(f"must be one of {allowed}, got {describe(value)}")
    if value not in choices:
        raise ValueError(f"must be one of {allowed}, got {value!r}{suggest(value, choices)}")
    return value


def parse_bool(value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        raise ValueError(
            f"must be true or false, got the string {value!r}; write it without quotes"
        )
    raise ValueError(f"must be true or false, got {describe(value)}")


def parse_float(value: Any, allowed: Range) -> float:
    """Return ``value`` as a finite float inside ``allowed``, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number {allowed}, got {describe(value)}{_unquote_hint(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number {allowed}, got {describe(value)}")
    if number not in allowed:
        raise ValueError(f"must be {allowed}, got {value!r}")
    return number


def parse_int(value: Any, allowed: Range) -> int:
    """Return ``value`` as an int inside ``allowed``, else raise ValueError.

    An integral float such as ``100.0`` or ``6e4`` is accepted and converted.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer {allowed}, got {describe(value)}{_unquote_hint(value)}")
    if value not in allowed:
        raise ValueError(f"must be an integer {allowed}, got {value}")
    return value


def describe(value: Any) -> str:
    """Describe a value read from YAML with its YAML type, as in "'wide' (string)"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (boolean)"
    if isinstance(value, str):
        return f"{value!r} (string)"
    if isinstance(value, int):
        return f"{value} (integer)"
    if isinstance(value, float):
        return f"{_number(value)} (number)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"{value!r} ({type(value).__name__})"


def suggest(word: Any, candidates: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest candidate, or "" when none is close."""
    if not isinstance(word, str):
        return ""
    matches = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def _unquote_hint(value: Any) -> str:
    """Return a hint to drop the quotes when a string contains a number."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return "; write the number without quotes"


def _number(value: float) -> str:
    """Format a number without a trailing ".0" when it is integral."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
