"""The ``mnistbench matrix show`` command: print what a matrix file expands to, without training.

    mnistbench matrix show ablations/default.yaml
    mnistbench matrix show ablations/default.yaml --set lr=0.001 --set epochs=1
    mnistbench matrix show ablations/default.yaml --json

It reads only the matrix file: no dataset is loaded and nothing is trained.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from mnistbench.cli import counted
from mnistbench.matrix import Cell, Matrix, Settings, apply_overrides, format_level, load_matrix
from mnistbench.matrix_checks import TRAIN_SIZES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mnistbench matrix`` and its show subcommand."""
    parser = subparsers.add_parser(
        "matrix",
        help="check a matrix file and show its cells",
        description="Check matrix files and show what they expand to.",
    )
    actions = parser.add_subparsers(dest="matrix_command", metavar="ACTION")
    actions.required = True

    show = actions.add_parser(
        "show",
        help="print the cells, run count and training cost of a matrix file",
        description=(
            "Check a matrix file and print its factors, a table of its cells, the number of "
            "runs (cells x seeds), the model-epochs to train and the training examples to "
            "process. Nothing is trained and no dataset is read. Exit status 2 if the file "
            "is invalid."
        ),
    )
    show.add_argument("file", type=Path, help="matrix YAML file")
    show.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train setting, for example --set lr=0.001 (VALUE is read as YAML; repeatable)",
    )
    show.add_argument(
        "--json", action="store_true", help="print the resolved matrix and its cells as JSON"
    )
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    """Print the matrix summary, or its JSON with --json, and return exit status 0."""
    matrix = apply_overrides(load_matrix(args.file), args.overrides)
    if args.json:
        print(render_json(matrix))
    else:
        print(render_summary(matrix))
    return 0


def render_json(matrix: Matrix) -> str:
    """Render the resolved matrix and its cells as indented JSON."""
    data = matrix.to_dict()
    data["cells"] = [
        {
            "index": cell.index,
            "cell_id": cell.cell_id,
            "levels": dict(cell.levels),
            "settings": cell.settings.to_dict(),
        }
        for cell in matrix.cells()
    ]
    return json.dumps(data, indent=2)


def render_summary(matrix: Matrix) -> str:
    """Render the matrix's factors, cell table, run count and training cost as text."""
    cells = matrix.cells()
    train_size = TRAIN_SIZES.get(matrix.dataset)
    lines = [f"matrix: {matrix.name}" + (f" ({matrix.source})" if matrix.source else "")]
    if train_size is None:
        lines.append(f"dataset: {matrix.dataset} (a directory; its size is known only when it is loaded)")
    else:
        lines.append(f"dataset: {matrix.dataset} ({train_size:,} training examples)")
    lines.append(f"seeds: {', '.join(str(seed) for seed in matrix.seeds)}")
    base = ", ".join(f"{name}={format_level(value)}" for name, value in matrix.train.to_dict().items())
    lines.append(f"base settings: {base}")

    lines.append("factors:")
    for name, levels in matrix.factors.items():
        if name in matrix.bundles:
            bundles = "; ".join(
                f"{bundle} ({_settings_text(settings)})" for bundle, settings in matrix.bundles[name].items()
            )
            lines.append(f"  {name} (bundles): {bundles}")
        else:
            lines.append(f"  {name}: {', '.join(format_level(level) for level in levels)}")
    if not matrix.factors:
        lines.append("  none: one cell with the base settings")
    for rule in matrix.exclude:
        lines.append(f"exclude: {_settings_text(rule)}")

    lines.append("")
    lines.extend(_cell_table(matrix, cells))
    lines.append("")

    runs = len(cells) * len(matrix.seeds)
    lines.append(f"cells: {len(cells)}")
    lines.append(f"runs: {runs} ({_count(len(cells), 'cell')} x "
                 f"{_count(len(matrix.seeds), 'seed')})")
    lines.extend(_cost_lines(matrix, cells, runs, train_size))
    return "\n".join(lines)


def _settings_text(settings: Mapping[str, Any]) -> str:
    text = ", ".join(f"{name}={format_level(value)}" for name, value in settings.items())
    return text or "base settings"


def _cell_table(matrix: Matrix, cells: list[Cell]) -> list[str]:
    """Return a table with one row per cell: index, levels, and settings that bundles vary."""
    varied = [
        item.name
        for item in fields(Settings)
        if item.name not in matrix.factors
        and len({format_level(getattr(cell.settings, item.name)) for cell in cells}) > 1
    ]
    header = ["index", *matrix.factors, *varied]
    rows = [
        [
            str(cell.index),
            *(format_level(level) for level in cell.levels.values()),
            *(format_level(getattr(cell.settings, name)) for name in varied),
        ]
        for cell in cells
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip())
    return lines


def _cost_lines(matrix: Matrix, cells: list[Cell], runs: int, train_size: int | None) -> list[str]:
    """Return the model-epochs and training examples that the matrix trains, summed over runs."""
    seeds = len(matrix.seeds)
    epochs = {cell.settings.epochs for cell in cells}
    model_epochs = sum(cell.settings.epochs for cell in cells) * seeds
    if len(epochs) == 1:
        count = epochs.pop()
        lines = [f"model-epochs: {model_epochs:,} ({counted(runs, 'run')} x "
                 f"{counted(count, 'epoch')})"]
    else:
        lines = [f"model-epochs: {model_epochs:,} (epochs summed over "
                 f"{counted(runs, 'run')})"]

    examples = {cell.settings.train_subset or train_size for cell in cells}
    if None in examples:
        lines.append(
            "training examples processed: unknown, because a directory dataset's size is known "
            "only when it is loaded; set train_subset for an exact count"
        )
        return lines
    total = sum(cell.settings.epochs * (cell.settings.train_subset or train_size) for cell in cells) * seeds
    if len(examples) == 1:
        per_epoch = f"model-epochs x {examples.pop():,} examples"
    else:
        per_epoch = "each cell's model-epochs x its training examples"
    lines.append(f"training examples processed: {total:,} ({per_epoch})")
    return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
