"""``mnistbench report``: render an ablation's HTML and Markdown report from its store.

    mnistbench report stores/default.sqlite --out reports/default
    mnistbench report stores/all.sqlite --out reports/wide --ablation wide

Prints the path of every file written. A missing store, or an ablation that is not in
it, raises StoreError, which the top-level command turns into exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnistbench.errors import MnistbenchError



def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    parser = subparsers.add_parser(
        "report", help="render an ablation's report (HTML and Markdown) from a store",
        description="Analyse one ablation of a store and write DIR/report.html (one "
                    "self-contained file), DIR/report.md and its PNG figures in DIR/figures.")
    parser.add_argument("store", type=Path, metavar="STORE", help="store file written by ablate")
    parser.add_argument("--out", type=_directory, required=True, metavar="DIR",
                        help="output directory, created when missing; existing report files "
                             "in it are replaced")
    parser.add_argument("--ablation", metavar="NAME",
                        help="ablation to report on (default: the store's only ablation)")
    parser.set_defaults(func=run_report_command)


def _directory(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "is empty; give an output directory, such as reports/default")
    return Path(text)


def run_report_command(args: argparse.Namespace) -> int:
    """Write the report and print the paths written; return exit status 0.

    Store raises StoreError for a missing store file, so no output directory is created.
    """
    from mnistbench.report import write_report  # imported here: seaborn is slow to import

    for parent in (args.out / "figures", args.out, *args.out.parents):
        if parent.exists() and not parent.is_dir():
            raise MnistbenchError(f"--out {args.out}: {parent} is a file, not a directory; "
                                  f"choose another output directory")
    for name in ("report.html", "report.md"):
        if (args.out / name).is_dir():
            raise MnistbenchError(f"--out {args.out}: {args.out / name} is a directory; "
                                  f"remove it or choose another output directory")
    try:
        paths = write_report(args.store, args.out, args.ablation)
    except OSError as error:
        target = Path(error.filename) if error.filename else None
        if isinstance(error, PermissionError) or target is None or not _related(target, args.out):
            raise
        raise MnistbenchError(f"--out {args.out}: cannot create {target}: "
                              f"{error.strerror or error}; choose another output "
                              f"directory") from error
    print(paths.html)
    print(paths.markdown)
    for path in paths.figures:
        print(path)
    return 0


def _related(path: Path, out: Path) -> bool:
    """Return whether ``path`` is ``out``, a folder above it or a file below it."""
    return path == out or path in out.parents or out in path.parents
