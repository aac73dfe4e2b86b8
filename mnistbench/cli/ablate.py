"""``mnistbench ablate MATRIX``: train every run of a matrix into a store.

    mnistbench ablate ablations/default.yaml
    mnistbench ablate ablations/smoke.yaml --store stores/smoke.sqlite --set lr=0.001
    mnistbench ablate ablations/default.yaml --dry-run
    mnistbench ablate ablations/default.yaml --backend ray --address 10.0.0.5:6379
    mnistbench ablate ablations/default.yaml --shard 2/4 --store stores/default-2.sqlite
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mnistbench.cli import counted, raise_terminated
from mnistbench.errors import MnistbenchError
from mnistbench.settings import format_level

if TYPE_CHECKING:
    from mnistbench.distributed import Shard
    from mnistbench.matrix import Matrix
    from mnistbench.store import Store

# Modules that import torch are imported inside the functions below, so that
# `mnistbench --help` and the other subcommands start quickly.


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate", help="train every run of a matrix file into a store",
        description="Train every run of a matrix that the store does not hold yet. "
                    "Interrupting is safe: finished stacks are kept, and running the same "
                    "command again resumes.")
    parser.add_argument("matrix", type=Path, help="matrix file (YAML)")
    parser.add_argument("--store", type=Path, default=None,
                        help="SQLite store to write (default: stores/<matrix name>.sqlite)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=None,
                        help="CPU worker processes, one torch thread each (default: one per core)")
    parser.add_argument("--max-stack", type=int, default=None,
                        help="most runs trained together as one stacked model "
                             "(default: 64 on CPU, 1024 on CUDA)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a train setting for every cell, e.g. --set lr=0.001 "
                             "(repeatable)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset cache directory (default: $MNISTBENCH_DATA_DIR or "
                             "~/.cache/mnistbench)")
    parser.add_argument("--dry-run", action="store_true",
                        help="show the cells, stacks and runs left to train; fetch no data, "
                             "create no store and train nothing")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: worker processes on this machine (default); ray: one Ray "
                             "task per stack on a Ray cluster (pip install 'mnistbench[ray]')")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address for --backend ray, e.g. 10.0.0.5:6379 "
                             "(default: the cluster 'ray start' started on this machine, "
                             "else a new local one)")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="train only shard K of N (1-based) of the matrix's runs, e.g. "
                             "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; combine "
                             "the shards' stores with 'mnistbench merge'")
    parser.set_defaults(func=run)


def default_store(matrix: Matrix) -> Path:
    return Path("stores") / f"{matrix.name}.sqlite"


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mnistbench.distributed import parse_shard
    from mnistbench.matrix import apply_overrides, load_matrix
    from mnistbench.outcome import RunResult
    from mnistbench.scheduler import Plan, check_dataset, resolve_device, run_ablation
    from mnistbench.store import Store

    for option, value in (("--workers", args.workers), ("--max-stack", args.max_stack)):
        if value is not None and value < 1:
            raise MnistbenchError(f"{option} must be at least 1; got {value}")
    if args.address is not None and args.backend != "ray":
        raise MnistbenchError(f"--address {args.address} applies only to --backend ray")
    shard = parse_shard(args.shard) if args.shard is not None else None
    matrix = load_matrix(args.matrix)
    if args.overrides:
        matrix = apply_overrides(matrix, args.overrides)
    store_path = args.store or default_store(matrix)
    check_dataset(matrix)
    if args.dry_run:
        return _dry_run(matrix, store_path, args, shard)

    # Check the device before any data loads, so a typo fails at once.
    # A Ray cluster's devices are checked on the cluster instead.
    if args.backend == "local":
        resolve_device(args.device)
    if args.overrides:
        # The stored matrix text then shows what actually trained.
        note = "\n# overridden on the command line: " + " ".join(
            f"--set {item}" for item in args.overrides) + "\n"
        matrix = replace(matrix, text=matrix.text + note)

    # A SIGTERM (from a scheduler or `kill`) unwinds like Ctrl-C, so claims are released,
    # and the command exits with 143 instead of Ctrl-C's 130.
    signal.signal(signal.SIGTERM, raise_terminated)
    bar = tqdm(total=0, unit="run", desc=matrix.name, dynamic_ncols=True, file=sys.stderr,
               disable=None)
    started = time.perf_counter()
    model_epochs = 0

    def on_plan(plan: Plan) -> None:
        finished = len(plan.assigned) - len(plan.pending) - plan.claimed_elsewhere
        scope = counted(len(plan.keyed), "run")
        if plan.shard is not None:
            scope += f" ({len(plan.assigned)} in shard {plan.shard})"
        elsewhere = (f", {plan.claimed_elsewhere} being trained by another process"
                     if plan.claimed_elsewhere else "")
        print(f"ablation {matrix.name}: {scope}, {finished} already in "
              f"{store_path}{elsewhere}, {len(plan.pending)} to train in "
              f"{counted(len(plan.stacks), 'stack')} on {plan.device} "
              f"({counted(plan.workers, 'worker')})")
        bar.reset(total=len(plan.pending))

    def on_stack(results: list[RunResult]) -> None:
        nonlocal model_epochs
        model_epochs += sum(len(r.epochs) - 1 for r in results if r.epochs)
        bar.update(len(results))
        rate = model_epochs / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix_str(f"{rate:.2f} model-epochs/s")

    try:
        summary = run_ablation(matrix, store_path, device=args.device, workers=args.workers,
                               max_stack=args.max_stack, data_dir=args.data_dir,
                               on_stack=on_stack, on_plan=on_plan, backend=args.backend,
                               address=args.address, shard=shard)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    print(f"trained {counted(summary.trained, 'run')} in {elapsed:.1f} s "
          f"({summary.crashed} crashed, {summary.claimed_elsewhere} left to another process)")
    with Store(store_path, readonly=True) as store:
        print_cell_table(store, matrix.name)
    print(f"store: {store_path}")
    return 0


def _dry_run(matrix: Matrix, store_path: Path, args: argparse.Namespace,
             shard: Shard | None) -> int:
    from mnistbench.data import KNOWN_DATASETS, dataset_dir, dataset_md5, missing_from_cache
    from mnistbench.distributed import RayCluster
    from mnistbench.scheduler import (
        DEFAULT_MAX_STACK_CPU,
        DEFAULT_MAX_STACK_CUDA,
        default_workers,
        plan_runs,
        resolve_device,
    )
    from mnistbench.store import Store

    # With Ray, the cluster decides the device and the number of workers. An error
    # below ends the process, and Ray disconnects at exit.
    cluster = RayCluster(args.address) if args.backend == "ray" else None
    if cluster is None:
        device = resolve_device(args.device)
        workers = args.workers or default_workers(device)
    else:
        device = cluster.resolve_device(args.device)
        workers = args.workers or cluster.slots(device)
    store = Store(store_path, readonly=True) if store_path.exists() else None
    max_stack = args.max_stack
    if max_stack is None:
        max_stack = DEFAULT_MAX_STACK_CUDA if device.type == "cuda" else DEFAULT_MAX_STACK_CPU
    # A dry run fetches nothing: the run keys need only the dataset's MD5, which the
    # registry gives for a known dataset and a directory's files give otherwise.
    plan = plan_runs(matrix, store, dataset_md5=dataset_md5(matrix.dataset), device=device,
                     workers=workers, max_stack=max_stack, shard=shard, cluster=cluster)
    if cluster is not None:
        cluster.shutdown()
    cells = matrix.cells()
    scope = f" ({len(plan.assigned)} in shard {shard})" if shard is not None else ""
    print(f"ablation {matrix.name}: {counted(len(cells), 'cell')} x "
          f"{counted(len(matrix.seeds), 'seed')} = {counted(len(plan.keyed), 'run')}{scope}; "
          f"{len(plan.assigned) - len(plan.pending)} already in "
          f"{store_path}")
    if matrix.dataset in KNOWN_DATASETS and missing_from_cache(matrix.dataset, args.data_dir):
        print(f"dataset {matrix.dataset} is not in the cache "
              f"{dataset_dir(matrix.dataset, args.data_dir)}; ablate fetches it before training")
    epochs = sum(m.settings.epochs for m in plan.pending)
    print(f"to train: {counted(len(plan.pending), 'run')}, "
          f"{counted(epochs, 'model-epoch')}, in {counted(len(plan.stacks), 'stack')} on "
          f"{plan.device} with {counted(workers, 'worker')}")
    for index, stack in enumerate(plan.stacks):
        settings = stack[0].settings
        seeds = describe_seeds(sorted({m.seed for m in stack}))
        print(f"  stack {index:3d}: {len(stack):4d} run{'' if len(stack) == 1 else 's'}, "
              f"seeds {seeds}, "
              f"activation={settings.activation} conv={format_level(settings.conv)} "
              f"pool={format_level(settings.pool)} width={settings.width} "
              f"epochs={settings.epochs}")
    if store is not None:
        store.close()
    return 0


def print_cell_table(store: Store, ablation: str) -> None:
    """Print one line per cell: runs, convergence and collapse rates, median accuracy."""
    runs = store.runs_frame(ablation)
    cells = store.cells_frame(ablation)
    width = max([len(c) for c in cells["cell_id"]] + [4])
    print(f"{'cell':<{width}}  runs  converged  collapsed  diverged  median acc  "
          "collapse classes")
    for cell_id in cells["cell_id"]:
        rows = runs[runs["cell_id"] == cell_id]
        n = len(rows)
        if n == 0:
            print(f"{cell_id:<{width}}  {0:4d}  {'-':>9}  {'-':>9}  {'-':>8}  {'-':>10}")
            continue
        converged = (rows["outcome"] == "converged").mean()
        collapsed = (rows["outcome"] == "collapsed").mean()
        diverged = (rows["outcome"] == "diverged").mean()
        accuracy = rows["final_accuracy"].median()
        classes = rows["collapse_class"].dropna().astype(int).value_counts()
        listed = ", ".join(f"{label} ({count} run{'' if count == 1 else 's'})"
                           for label, count in classes.items())
        top = listed or "-"
        accuracy_text = f"{accuracy:10.4f}" if accuracy == accuracy else f"{'-':>10}"
        print(f"{cell_id:<{width}}  {n:4d}  {converged:9.0%}  {collapsed:9.0%}  "
              f"{diverged:8.0%}  {accuracy_text}  {top}")


def describe_seeds(seeds: list[int]) -> str:
    """Describe ascending seed indexes as a range when they are consecutive, else as a
    list of at most six."""
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    listed = ", ".join(str(seed) for seed in seeds[:6])
    return listed if len(seeds) <= 6 else f"{listed}, ... ({len(seeds)} seeds)"
