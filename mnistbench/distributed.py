"""Training beyond one machine: shards for batch schedulers and the Ray backend.

    mnistbench ablate ablations/default.yaml --shard 2/4 --store stores/part-2.sqlite
    mnistbench ablate ablations/default.yaml --backend ray --address 10.0.0.5:6379

A shard (:class:`Shard`) is a fixed part of a matrix's runs. A run belongs to shard
``K`` of ``N`` when its run key, read as a hexadecimal number, is ``K - 1`` modulo
``N``. The rule depends only on the run key, so every shard of one matrix trains a
disjoint part whatever its store already contains, and a run stays in its shard when
the matrix gains levels. Run keys are SHA-256 digests, so shards get nearly equal
numbers of runs, but not exactly equal ones.

The Ray backend (:class:`RayCluster`) trains each stack as one Ray task. The task
requests one GPU when the cluster has GPUs and trains there. Otherwise it requests
one CPU and trains with one torch thread. The driver puts the dataset's uint8 tensors into Ray's object
store once (about 55 MB for MNIST), so workers need no copy of the dataset. Ray
copies the tensors to each node once. The driver writes every finished stack into
its store as the stack arrives. Ray is an optional dependency:
``pip install 'mnistbench[ray]'``.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mnistbench.engine import DeviceData, Member
from mnistbench.errors import MnistbenchError
from mnistbench.matrix import Criteria
from mnistbench.outcome import RunResult

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")

_SHARD_PATTERN = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
# A task is not retried when its worker process or node dies. Errors inside training
# are already stored as crashed runs (see scheduler.train_safely), so a failed task
# means a lost process, and the next ablate trains its runs again.
TASK_RETRIES = 0
# How long the driver waits for a TCP connection to --address before it reports the
# cluster unreachable. Without this check ray.init retries for minutes.
CONNECT_TIMEOUT_SECONDS = 5.0


# -- shards ---------------------------------------------------------------------------


def shard_of(run_key: str, count: int) -> int:
    """Return the 1-based shard of ``count`` shards that a run key belongs to."""
    return int(run_key, 16) % count + 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based), as given by ``--shard K/N``."""

    index: int
    count: int

    def contains(self, run_key: str) -> bool:
        """Return whether the run with this key belongs to this shard."""
        return shard_of(run_key, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """Parse ``--shard K/N`` into a Shard.

    Raises:
        MnistbenchError: the text is not ``K/N`` or K is not between 1 and N.
    """
    match = _SHARD_PATTERN.fullmatch(text)
    if match is None:
        raise MnistbenchError(
            f"invalid --shard {text!r}; expected K/N with 1 <= K <= N, e.g. --shard 2/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise MnistbenchError(f"invalid --shard {text!r}: the shard count must be at least 1")
    if not 1 <= index <= count:
        raise MnistbenchError(
            f"invalid --shard {text!r}: shard {index} is out of range 1 to {count}; shards "
            f"count from 1, so submit a Slurm array as --array=1-{count}")
    return Shard(index, count)


# -- the Ray backend ------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "ray":
            raise
        raise MnistbenchError("the ray backend needs Ray: pip install 'mnistbench[ray]'") from None
    return ray


def _check_reachable(address: str) -> None:
    """Raise MnistbenchError unless ``host:port`` accepts a TCP connection."""
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit() or "://" in address:
        return  # "auto", "local" or a ray:// address: ray.init resolves these itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)),
                                      timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as error:
        raise MnistbenchError(
            f"cannot reach the Ray cluster at --address {address}: {error}; start one with "
            f"'ray start --head' and pass the address it prints") from None


class RayCluster:
    """A driver's connection to a Ray cluster, which trains stacks as Ray tasks."""

    def __init__(self, address: str | None = None) -> None:
        """Connect to the cluster at ``address``.

        Without an address, ray.init connects to a cluster that ``ray start`` started
        on this machine, or else starts a local cluster that ends with this process.
        """
        self.ray = _import_ray()
        if address is not None:
            _check_reachable(address)
        options: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
        if address is None:
            options["include_dashboard"] = False  # only valid when ray.init starts a cluster
        try:
            self.ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise MnistbenchError(
                f"cannot connect to the Ray cluster at {address or 'this machine'}: "
                f"{error}") from None
        self.address = self.ray.get_runtime_context().gcs_address
        resources = self.ray.cluster_resources()
        self.cpus = int(resources.get("CPU", 0))
        self.gpus = int(resources.get("GPU", 0))
        logger.info("connected to the Ray cluster at %s: %d CPUs, %d GPUs", self.address,
                    self.cpus, self.gpus)

    def shutdown(self) -> None:
        """Disconnect; a cluster that ray.init started for this process stops."""
        self.ray.shutdown()

    def resolve_device(self, requested: str | None) -> torch.device:
        """Return the device type the tasks train on: CUDA when the cluster has GPUs."""
        if requested in (None, "auto"):
            return torch.device("cuda" if self.gpus else "cpu")
        if requested == "cpu":
            return torch.device("cpu")
        if requested == "cuda":
            if not self.gpus:
                raise MnistbenchError(
                    f"--device cuda requested but the Ray cluster at {self.address} has no "
                    f"GPUs ({self.cpus} CPUs); use --device cpu or add GPU nodes")
            return torch.device("cuda")
        raise MnistbenchError(
            f"invalid --device {requested!r} with --backend ray; expected auto, cpu or cuda "
            f"(Ray assigns one GPU to each task, so cuda:N does not apply)")

    def slots(self, device: torch.device) -> int:
        """Return how many tasks the cluster runs at once: its GPUs or its CPUs."""
        count = self.gpus if device.type == "cuda" else self.cpus
        if count < 1:
            raise MnistbenchError(f"the Ray cluster at {self.address} has no "
                                  f"{'GPUs' if device.type == 'cuda' else 'CPUs'} to train on")
        return count

    def describe(self, device: torch.device) -> str:
        """Describe where training runs, for the plan line that ``ablate`` prints."""
        units = f"{self.gpus} GPUs" if device.type == "cuda" else f"{self.cpus} CPUs"
        return f"{device.type} via Ray at {self.address} with {units}"

    def train(self, stacks: Sequence[list[Member]], data: DeviceData, criteria: Criteria,
              device: torch.device, info: dict,
              finish: Callable[[list[RunResult]], None]) -> None:
        """Train every stack as a Ray task and call ``finish`` with each stack's results.

        Results arrive in the order tasks finish. A task whose worker process or node
        dies is logged and skipped, the remaining tasks go on, and MnistbenchError is
        raised at the end. The runs of the failed stacks stay out of the store, so the
        next ``ablate`` trains them.

        Args:
            stacks: the stacks to train, one task each.
            data: the dataset, on the CPU of the driver.
            criteria: the outcome thresholds.
            device: "cpu" or "cuda"; each task requests one CPU or one GPU from Ray.
            info: the driver's provenance. A worker whose own provenance differs
                gets a warning, and its runs are stored with the worker's provenance.
            finish: stores one stack's results.
        """
        if not stacks:
            return
        ray = self.ray
        payload = ray.put({
            "train_images": data.train_images.numpy(), "train_labels": data.train_labels.numpy(),
            "test_images": data.test_images.numpy(), "test_labels": data.test_labels.numpy(),
            "md5": data.md5,
        })
        # NOTE: the GPU branch has not run in the test suite, which has no GPU.
        resources = {"num_gpus": 1, "num_cpus": 1} if device.type == "cuda" else {"num_cpus": 1}
        task = ray.remote(max_retries=TASK_RETRIES, **resources)(train_stack_task)
        running = {task.remote(stack, payload, criteria, device.type): stack for stack in stacks}
        failures: list[tuple[list[Member], BaseException]] = []
        warned: set[tuple] = set()
        try:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    stack = running.pop(ref)
                    try:
                        results = ray.get(ref)
                    except ray.exceptions.RayError as error:
                        logger.error("a Ray task of %d runs (first run %s) failed: %s",
                                     len(stack), stack[0].run_key, _first_line(error))
                        failures.append((stack, error))
                        continue
                    _warn_on_other_provenance(results, info, warned)
                    finish(results)
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
        if failures:
            runs = sum(len(stack) for stack, _ in failures)
            raise MnistbenchError(
                f"{len(failures)} of {len(stacks)} stacks ({runs} runs) failed on the Ray "
                f"cluster, first with: {_first_line(failures[0][1])}; the finished stacks are "
                f"stored, so running the same ablate command again trains the rest")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _warn_on_other_provenance(results: list[RunResult], info: dict, warned: set[tuple]) -> None:
    if not results or results[0].provenance == info:
        return
    differing = tuple(sorted((key, str(value)) for key, value in results[0].provenance.items()
                             if info.get(key) != value))
    if differing in warned:
        return
    warned.add(differing)
    described = ", ".join(f"{key} {value!r} (driver: {info.get(key)!r})"
                          for key, value in differing)
    logger.warning("a Ray worker trains with other provenance: %s; its runs are stored "
                   "with the worker's values", described)


# -- inside a Ray worker process ------------------------------------------------------

# The dataset converted for the last task in this worker process, by (MD5, device).
# Ray reuses worker processes, so later tasks of one ablate skip the conversion.
_WORKER_DATA: dict[tuple[str, str], DeviceData] = {}


def _device_data(payload: dict, device: torch.device) -> DeviceData:
    cache_key = (payload["md5"], str(device))
    if cache_key not in _WORKER_DATA:
        _WORKER_DATA.clear()

        # Arrays from the object store are read-only, and torch.from_numpy warns on
        # those, so each array is copied once per worker process.
        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(payload[name], copy=True)).to(device)

        _WORKER_DATA[cache_key] = DeviceData(
            tensor("train_images"), tensor("train_labels"), tensor("test_images"),
            tensor("test_labels"), payload["md5"])
    return _WORKER_DATA[cache_key]


def train_stack_task(stack: list[Member], payload: dict, criteria: Criteria,
                     device_type: str) -> list[RunResult]:
    """Train one stack inside a Ray worker, with one torch thread on the CPU.

    The runs carry this worker's provenance (package version, git commit, torch
    version) and the MD5 of the dataset that the driver sent.
    """
    from mnistbench.provenance import provenance
    from mnistbench.scheduler import train_safely

    device = torch.device(device_type)
    if device.type == "cpu":
        torch.set_num_threads(1)
    data = _device_data(payload, device)
    return train_safely(stack, data, criteria, provenance(data.md5), device)
