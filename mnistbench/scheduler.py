"""Run an ablation: key its runs, skip finished ones, train the rest in stacks, store results.

    summary = run_ablation(load_matrix("ablations/smoke.yaml"), "stores/smoke.sqlite")

Expanding the matrix (``matrix``) and training (``engine``) stay separate. This module
turns the matrix's runs into stacks and hands them to worker processes on the CPU, one
torch thread each, because that keeps every core busy and the runs deterministic. On a
GPU it trains them in this process. Each finished stack goes to the store in one
transaction. Runs this process is about to train are claimed in the store first, so
a second ``ablate`` on the same store trains other runs instead of the same ones.
With ``backend="ray"`` the stacks become Ray tasks on a cluster instead, and with a
``shard`` only that shard's runs train (see ``mnistbench.distributed``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
import multiprocessing

import torch

from mnistbench import native
from mnistbench.data import dataset_directory, directory_files, load_dataset
from mnistbench.distributed import BACKENDS, RayCluster, Shard
from mnistbench.engine import DeviceData, Member, train_stack
from mnistbench.errors import DataError, MatrixError, MnistbenchError
from mnistbench.matrix import Cell, Criteria, Matrix
from mnistbench.model import structure_of
from mnistbench.outcome import RunResult
from mnistbench.provenance import device_name, provenance
from mnistbench.store import Store, check_store_path, run_key

logger = logging.getLogger(__name__)

DEFAULT_MAX_STACK_CPU = 64  # runs per stack on the CPU: wide enough for efficient matmuls
DEFAULT_MAX_STACK_CUDA = 1024  # a GPU needs wide stacks to fill its cores


@dataclass(frozen=True)
class Plan:
    """The work of one ``ablate`` call: all runs, the ones still to train, and their stacks."""

    keyed: list[tuple[Cell, int, str]]  # (cell, seed, run key) for every run of the matrix
    pending: list[Member]
    stacks: list[list[Member]]
    device: str
    workers: int
    shard: Shard | None = None  # the part of the matrix this process trains; None for all
    claimed_elsewhere: int = 0  # pending runs that another process on the store is training

    @property
    def assigned(self) -> list[tuple[Cell, int, str]]:
        """Return ``keyed`` restricted to this process's shard."""
        if self.shard is None:
            return self.keyed
        return [entry for entry in self.keyed if self.shard.contains(entry[2])]


@dataclass(frozen=True)
class Summary:
    """Counts of what one ``ablate`` call trained and skipped."""

    total_runs: int  # runs of the matrix in this process's shard; all runs without one
    already_finished: int
    trained: int
    claimed_elsewhere: int
    crashed: int


def resolve_device(requested: str | None) -> torch.device:
    """Return the training device: the one requested, else CUDA when present, else CPU."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise MnistbenchError(
            f"invalid --device {requested!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MnistbenchError(f"--device {requested} requested but no CUDA device is available; "
                              f"use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise MnistbenchError(f"unsupported --device {requested!r}; expected cpu or cuda")
    return device


def default_workers(device: torch.device) -> int:
    """Return the default worker count: one per usable core on the CPU, one on a GPU."""
    if device.type != "cpu":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def stack_cost(stack: Sequence[Member]) -> float:
    """Relative cost of a stack: runs x epochs x training examples x layer-one width."""
    settings = stack[0].settings
    examples = settings.train_subset or 60_000
    return len(stack) * settings.epochs * examples * settings.input_features() * settings.width


def plan_stacks(members: Sequence[Member], max_stack: int, workers: int = 1
                ) -> list[list[Member]]:
    """Group runs into stacks of one structure, at most ``max_stack`` runs each.

    Runs of one seed are kept next to each other, because a stack trains each seed's
    runs as one wide matmul. Stacks are split further until there are at least
    ``workers`` of them, and returned costliest first so that parallel workers finish
    together.
    """
    if max_stack < 1:
        raise MnistbenchError(f"--max-stack must be at least 1; got {max_stack}")
    groups: dict[tuple, list[Member]] = {}
    for member in members:
        groups.setdefault(structure_of(member.settings), []).append(member)
    stacks = []
    for group in groups.values():
        ordered = sorted(group, key=lambda m: m.seed)
        stacks.extend(_split(ordered, math.ceil(len(ordered) / max_stack)))
    while len(stacks) < workers:
        largest = max(stacks, key=len, default=None)
        if largest is None or len(largest) < 2:
            break
        stacks.remove(largest)
        stacks.extend(_split(largest, 2))
    return sorted(stacks, key=stack_cost, reverse=True)


def _split(members: list[Member], parts: int) -> list[list[Member]]:
    size, extra = divmod(len(members), parts)
    result, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        result.append(members[start:end])
        start = end
    return [part for part in result if part]


def key_runs(matrix: Matrix, dataset_md5: str, device: torch.device) -> list[tuple[Cell, int, str]]:
    """Return ``(cell, seed, run key)`` for every run of the matrix, in matrix order.

    On the CPU the key of a run with the convolution front records whether the
    compiled kernels train it, and which build of them, so that a store never mixes
    runs whose numbers differ.
    """
    kernels = None
    if device.type == "cpu" and any(cell.settings.conv for cell in matrix.cells()):
        kernels = native.kernels_id()
    return [(cell, seed, run_key(cell.settings.to_dict(), seed, dataset_md5, device.type,
                                 kernels if cell.settings.conv else None))
            for cell, seed in matrix.runs()]


def train_safely(stack: Sequence[Member], data: DeviceData, criteria: Criteria,
                 info: dict, device: torch.device) -> list[RunResult]:
    """Train a stack; if it raises, train its runs one by one and record crashes.

    A run that raises on its own is stored as ``crashed`` with the error text, and
    never stops the other runs of its stack.
    """
    try:
        return train_stack(stack, data, criteria, info, device)
    except Exception as error:  # noqa: BLE001 - any failure is recorded, never re-raised
        if len(stack) == 1:
            logger.warning("run %s (seed %d) crashed: %s", stack[0].run_key, stack[0].seed,
                           error)
            return [_crashed(stack[0], error, info, device)]
        logger.warning("a stack of %d runs failed (%s); training its runs one by one",
                       len(stack), error)
    results = []
    for member in stack:
        results.extend(train_safely([member], data, criteria, info, device))
    return results


def _crashed(member: Member, error: BaseException, info: dict, device: torch.device
             ) -> RunResult:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return RunResult(run_key=member.run_key, seed=member.seed,
                     settings=member.settings.to_dict(), outcome="crashed",
                     collapse_class=None, final_accuracy=None, final_train_loss=None,
                     max_class_share=None, error=text, device=str(device), provenance=info)


# -- worker processes -------------------------------------------------------------------

_WORKER: dict = {}


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the parent process dies (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: workers end when they next fail to reach the parent


def _init_worker(dataset: str, data_dir: str | None, criteria: Criteria, info: dict) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    torch.set_num_threads(1)
    loaded = load_dataset(dataset, data_dir, fetch=False)
    _WORKER.update(data=DeviceData.from_dataset(loaded, "cpu"), criteria=criteria, info=info)


def _train_in_worker(stack: list[Member]) -> list[RunResult]:
    return train_safely(stack, _WORKER["data"], _WORKER["criteria"], _WORKER["info"],
                        torch.device("cpu"))


# -- the ablation -----------------------------------------------------------------------


def check_dataset(matrix: Matrix) -> None:
    """Raise MatrixError, naming the matrix file, when the matrix's dataset directory is unusable.

    A directory must exist and contain the four IDX files. ``load_matrix`` does not
    check this, so that ``matrix show`` works on a matrix written for another machine.
    A known dataset passes, because training fetches it when the cache lacks it.
    """
    try:
        directory = dataset_directory(matrix.dataset)
        if directory is not None:
            directory_files(directory)
    except DataError as error:
        raise MatrixError(f"{matrix.source or 'matrix'}: dataset: {error}") from None


def plan_runs(matrix: Matrix, store: Store | None, *, dataset_md5: str, device: torch.device,
              workers: int, max_stack: int, shard: Shard | None = None,
              cluster: RayCluster | None = None) -> Plan:
    """Key every run and plan the stacks of the runs not yet in the store; read no data.

    With a ``shard``, only that shard's runs are pending.
    """
    keyed = key_runs(matrix, dataset_md5, device)
    finished = store.finished_keys() if store is not None else set()
    pending = [Member(key, seed, cell.settings) for cell, seed, key in keyed
               if key not in finished and (shard is None or shard.contains(key))]
    stacks = plan_stacks(pending, max_stack, workers)
    where = device_name(device) if cluster is None else cluster.describe(device)
    return Plan(keyed, pending, stacks, where, workers, shard)


def _check_train_subsets(matrix: Matrix, train_size: int) -> None:
    """Reject a train_subset larger than the dataset's training set.

    Named datasets are checked when the matrix is read; a dataset directory's size is
    known only once it is loaded.
    """
    for cell in matrix.cells():
        subset = cell.settings.train_subset
        if subset is not None and subset > train_size:
            raise MatrixError(
                f"{matrix.source or 'matrix'}: cell {cell.cell_id!r}: train_subset {subset} "
                f"is larger than the {train_size} training examples of dataset "
                f"{matrix.dataset}; expected at most {train_size}")


def prepare(matrix: Matrix, store: Store | None, *, device: torch.device, workers: int,
            max_stack: int, data_dir: str | None = None, shard: Shard | None = None,
            cluster: RayCluster | None = None) -> tuple[Plan, DeviceData]:
    """Load the data, fetching it when the cache lacks it, and plan the runs (see plan_runs).

    With a Ray ``cluster``, the data stays on this machine's CPU, because the cluster's
    workers train.
    """
    dataset = load_dataset(matrix.dataset, data_dir)
    _check_train_subsets(matrix, len(dataset.train_labels))
    data = DeviceData.from_dataset(dataset, device if cluster is None else "cpu")
    plan = plan_runs(matrix, store, dataset_md5=dataset.md5, device=device, workers=workers,
                     max_stack=max_stack, shard=shard, cluster=cluster)
    return plan, data


def run_ablation(matrix: Matrix, store_path: str | Path, *, device: str | None = None,
                 workers: int | None = None, max_stack: int | None = None,
                 data_dir: str | None = None,
                 on_stack: Callable[[list[RunResult]], None] | None = None,
                 on_plan: Callable[[Plan], None] | None = None,
                 backend: str = "local", address: str | None = None,
                 shard: Shard | None = None) -> Summary:
    """Train every run of the matrix (or of one shard) that the store does not hold yet.

    A store file that does not exist yet is created only once the data is loaded and
    the runs are planned, so a call that fails before training leaves no file behind.
    An existing store is opened first, so a file that is not a store fails fast.

    Args:
        matrix: the validated matrix.
        store_path: the store file that results go to; the resolved matrix is stored
            before training.
        device: "auto" (default), "cpu", "cuda" or "cuda:N" ("cuda:N" not with Ray).
        workers: CPU worker processes; default one per core (1 on a GPU). With Ray, the
            number of stacks to split the runs into at least; default the cluster's
            GPUs, else its CPUs.
        max_stack: most runs trained together; default 64 on CPU, 1024 on a GPU.
        data_dir: dataset cache directory (default: see ``mnistbench.data.cache_dir``).
        on_stack: called with each stack's results after they are stored.
        on_plan: called once with the plan before training starts.
        backend: "local" (this machine) or "ray" (one Ray task per stack).
        address: the Ray cluster for backend "ray"; default: one that ``ray start``
            started on this machine, else a new one for this process.
        shard: train only this shard's runs; the store still records the whole matrix.
    """
    if backend not in BACKENDS:
        raise MnistbenchError(f"unknown backend {backend!r}; expected one of "
                              f"{', '.join(BACKENDS)}")
    if backend == "local" and address is not None:
        raise MnistbenchError(f"--address {address} applies only to --backend ray")
    check_dataset(matrix)
    store_path = Path(store_path)
    with contextlib.ExitStack() as resources:
        if store_path.exists():
            existing = resources.enter_context(Store(store_path))
        else:
            check_store_path(store_path)
            existing = None

        def open_store() -> Store:
            if existing is not None:
                return existing
            return resources.enter_context(Store(store_path))

        cluster = None
        if backend == "ray":
            cluster = RayCluster(address)
            resources.callback(cluster.shutdown)
        return _run_ablation(matrix, existing, open_store, device, workers, max_stack, data_dir,
                             on_stack, on_plan, shard, cluster)


def _run_ablation(matrix: Matrix, existing: Store | None, open_store: Callable[[], Store],
                  device: str | None, workers: int | None, max_stack: int | None,
                  data_dir: str | None, on_stack: Callable[[list[RunResult]], None] | None,
                  on_plan: Callable[[Plan], None] | None, shard: Shard | None,
                  cluster: RayCluster | None) -> Summary:
    if cluster is None:
        torch_device = resolve_device(device)
        workers = workers or default_workers(torch_device)
    else:
        torch_device = cluster.resolve_device(device)
        workers = workers or cluster.slots(torch_device)
    reduced = sorted({cell.settings.precision for cell in matrix.cells()} - {"float32"})
    if torch_device.type == "cpu" and reduced:
        logger.warning("precision %s applies to CUDA matmuls only; on the CPU those runs "
                       "train in float32 and match their float32 twins", " and ".join(reduced))
    if workers < 1:
        raise MnistbenchError(f"--workers must be at least 1; got {workers}")
    cores = default_workers(torch_device)
    if cluster is None and torch_device.type == "cpu" and workers > cores:
        logger.warning("%d workers share %d cores: each trains on one thread, so the extra "
                       "workers split the stacks smaller and slow the ablation down",
                       workers, cores)
    if max_stack is None:
        max_stack = DEFAULT_MAX_STACK_CUDA if torch_device.type == "cuda" else DEFAULT_MAX_STACK_CPU
    plan, data = prepare(matrix, existing, device=torch_device, workers=workers,
                         max_stack=max_stack, data_dir=data_dir, shard=shard, cluster=cluster)
    store = open_store()
    store.save_ablation(matrix, plan.keyed)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    claimed = set(store.claim([m.run_key for m in plan.pending], owner))
    mine = [m for m in plan.pending if m.run_key in claimed]
    already_finished = len(plan.assigned) - len(plan.pending)
    claimed_elsewhere = len(plan.pending) - len(mine)
    if claimed_elsewhere:
        logger.info("%d runs are being trained by another process on this store; skipping them",
                    claimed_elsewhere)
    stacks = plan_stacks(mine, max_stack, workers) if mine else []
    plan = Plan(plan.keyed, mine, stacks, plan.device, workers, shard, claimed_elsewhere)
    if on_plan is not None:
        on_plan(plan)
    info = provenance(data.md5)
    crashed = 0

    def finish(results: list[RunResult]) -> None:
        nonlocal crashed
        store.write_results(results)
        crashed += sum(r.outcome == "crashed" for r in results)
        if on_stack is not None:
            on_stack(results)

    try:
        if cluster is not None:
            cluster.train(stacks, data, matrix.criteria, torch_device, info, finish)
        elif workers == 1 or torch_device.type != "cpu" or len(stacks) <= 1:
            for stack in stacks:
                finish(train_safely(stack, data, matrix.criteria, info, torch_device))
        else:
            _run_in_workers(stacks, matrix, data_dir, info, workers, finish)
    finally:
        store.release(owner)
    return Summary(total_runs=len(plan.assigned), already_finished=already_finished,
                   trained=len(mine), claimed_elsewhere=claimed_elsewhere, crashed=crashed)


def _run_in_workers(stacks: list[list[Member]], matrix: Matrix, data_dir: str | None,
                    info: dict, workers: int, finish: Callable[[list[RunResult]], None]) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(stacks)), mp_context=context,
                             initializer=_init_worker,
                             initargs=(matrix.dataset, data_dir, matrix.criteria, info)) as pool:
        futures = {pool.submit(_train_in_worker, stack) for stack in stacks}
        try:
            while futures:
                done, futures = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(future.result())
        except BrokenProcessPool as error:
            raise MnistbenchError(
                f"a worker process died ({error}); finished stacks are stored, so running "
                f"the same ablate command again resumes with the rest"
            ) from None
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or failed: stop the workers now instead of
            # letting the executor wait for the stacks they are training.
            # NOTE: ProcessPoolExecutor has no public way to end running tasks, so this
            # reaches into its process table.
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            raise
