"""``mnistbench merge OUT IN...``: combine stores, such as the shards of a Slurm array.

    mnistbench merge stores/default.sqlite stores/default-1.sqlite stores/default-2.sqlite
    mnistbench merge stores/all.sqlite stores/laptop.sqlite stores/old.sqlite --allow-mismatch
"""

from __future__ import annotations

import argparse
from pathlib import Path

# mnistbench.merge imports pandas through the store, so it is imported in run() to
# keep `mnistbench --help` fast.


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", help="combine stores, such as the shards of a Slurm array, into one store",
        description="Copy the ablations, runs and epochs of the input stores into the output "
                    "store, which may be new or already hold results. The output changes "
                    "in one transaction, and only if the stores agree: one matrix per "
                    "ablation, one result per run, one run per cell and seed, and one "
                    "dataset and mnistbench version per ablation.")
    parser.add_argument("output", type=Path, help="store to write (created when missing)")
    parser.add_argument("inputs", type=Path, nargs="+", help="stores to read")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="merge runs of another dataset MD5 or mnistbench version into "
                             "one ablation instead of stopping")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mnistbench.merge import merge_stores

    report = merge_stores(args.output, args.inputs, allow_mismatch=args.allow_mismatch)
    for note in report.notes:
        print(f"note: {note}")
    print(f"merged {len(args.inputs)} stores into {report.output}: {report.runs_added} runs "
          f"added, {report.runs_already_present} already present")
    for name, (stored, total) in sorted(report.stored.items()):
        line = f"  ablation {name}: {stored} of {total} runs stored"
        if stored < total:
            line += (f"; run 'mnistbench ablate MATRIX --store {report.output}' to train the "
                     f"{total - stored} missing")
        print(line)
    return 0
