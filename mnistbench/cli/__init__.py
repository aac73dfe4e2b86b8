"""The ``mnistbench`` command line.

Each subcommand lives in its own module of this package and adds itself to the
parser through a ``register(subparsers)`` function.

    mnistbench data fetch
    mnistbench matrix show ablations/default.yaml
    mnistbench ablate ablations/default.yaml
    mnistbench report stores/default.sqlite --out reports/default
    mnistbench check stores/smoke.sqlite --thresholds ablations/thresholds.yaml
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mnistbench import __version__
from mnistbench.errors import MnistbenchError

# Modules of this package that define subcommands, in the order of the help text.
# A module that does not exist yet is skipped so the parser always builds.
COMMAND_MODULES = ("data", "matrix", "ablate", "report", "check", "merge")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="mnistbench",
        description="Train ablation matrices of small MNIST classifiers and report on them.",
    )
    parser.add_argument("--version", action="version", version=f"mnistbench {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mnistbench.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"mnistbench.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status (0 ok, 1 check failed, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        level = logging.WARNING
    elif args.verbose > 1:
        level = logging.DEBUG
    else:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = args.func(args)
    except MnistbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept in the store", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
