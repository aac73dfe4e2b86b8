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
import os
import select
import signal
import sqlite3
import sys

from mnistbench import __version__
from mnistbench.errors import MnistbenchError

class Terminated(KeyboardInterrupt):
    """A termination signal such as SIGTERM, raised like Ctrl-C so that the same cleanup runs.

    It derives from KeyboardInterrupt, so ``except Exception`` blocks that record crashed
    runs do not catch it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def counted(count: int, noun: str) -> str:
    """Return a count with its noun, plural unless the count is 1: "1 run", "3 runs"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def raise_terminated(signum: int, frame: object) -> None:
    """Raise Terminated; a signal handler for ``signal.signal``."""
    raise Terminated(signum)


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
    """Run the command line and return its exit status.

    0: ok, 1: check failed, 2: invalid input. A command ended by a signal returns 128 +
    the signal number: 130 for Ctrl-C (SIGINT) and 143 for SIGTERM, which only ablate
    handles. When the reader of stdout goes away, as `head` does, the command ends
    quietly with 141 (SIGPIPE).
    """
    try:
        try:
            return _run_command(argv)
        finally:
            sys.stdout.flush()  # here, so that a closed stdout fails now and not at exit
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # Python flushes stdout again at exit; pointing it at /dev/null keeps that quiet.
        # This is the recipe of the Python docs, "Note on SIGPIPE" in the signal module.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _stdout_closed() -> bool:
    """Return whether stdout is a pipe whose read end is closed."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (AttributeError, OSError, ValueError):  # no poll(), or stdout has no descriptor
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


def _run_command(argv: list[str] | None) -> int:
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
    except sqlite3.OperationalError as error:
        # A store on a read-only file or folder raises this mid-command. SQLite rolls the
        # failed transaction back, so the runs already stored remain.
        print(f"error: the store could not be written: {error}; check that the store file "
              "and its folder are writable", file=sys.stderr)
        return 2
    except PermissionError as error:
        print(f"error: {error.filename}: permission denied; choose a path that this user "
              "can write", file=sys.stderr)
        return 2
    except Terminated as terminated:
        print(f"terminated by {terminated}; finished runs are kept in the store",
              file=sys.stderr)
        return 128 + terminated.signum
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept in the store", file=sys.stderr)
        return 128 + signal.SIGINT
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
