"""The Ray backend: a real two-node Ray cluster on 127.0.0.1 trains a tiny matrix.

The cluster runs from a private temporary directory (RAY_TMPDIR), so it shares no
files with any other Ray on the machine, and the fixture stops exactly the
processes it started. Ray on Linux replaces 127.0.0.1 in an address with the
machine's network IP, so a driver could not reach a cluster that listens on
127.0.0.1 only. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 turns that off (Ray 2.60).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from builders import TINY_MATRIX, Planned, build_store, count_runs, store_contents
from mnistbench.cli import main
from mnistbench.errors import MnistbenchError
from mnistbench.store import Store

REPO = Path(__file__).resolve().parent.parent

# The same cells on three times the examples, so that a stack trains for about a
# second and a kill lands while a worker is training.
SLOWER_MATRIX = TINY_MATRIX.replace("train_subset: 2000", "train_subset: 6000")
TASK_TITLE = "ray::train_stack_task"  # the process title Ray gives a worker running a task


@dataclass(frozen=True)
class RayTestCluster:
    address: str
    environment: dict[str, str]  # for drivers: the cluster's temp dir, loopback addresses
    raylet_pids: frozenset[int]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayTestCluster]:
    """Start a head node and one worker node, one CPU each, and stop them afterwards."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    # A short path: Ray's Unix sockets live under it, and their paths are limited to
    # 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="mb-ray-", dir="/tmp")
    environment = {"RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    node = {"num_cpus": 1, "num_gpus": 0, "node_ip_address": "127.0.0.1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        cluster = cluster_utils.Cluster(initialize_head=True,
                                        head_node_args={**node, "include_dashboard": False})
        try:
            cluster.add_node(**node)
            cluster.wait_for_nodes()
            raylets = frozenset(info.process.pid for node in cluster.list_all_nodes()
                                for info in node.all_processes["raylet"])
            yield RayTestCluster(cluster.address, {**os.environ, **environment}, raylets)
        finally:
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def ablate(matrix: Path, store: Path, *extra: str, environment: dict | None = None,
           cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mnistbench", "ablate", str(matrix), "--store", str(store),
               "--device", "cpu", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=environment)


def training_workers(raylet_pids: frozenset[int]) -> list[int]:
    """Return the pids of this cluster's worker processes that are running a task now."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while being read
        if parent in raylet_pids and title.startswith(TASK_TITLE):
            pids.append(int(entry.name))
    return pids


@pytest.fixture()
def tiny_matrix(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_MATRIX)
    return path


@pytest.mark.ray
@pytest.mark.mnist
@pytest.mark.slow
def test_ray_store_equals_local_store(ray_cluster: RayTestCluster, tiny_matrix: Path,
                                      tmp_path: Path) -> None:
    local_path, ray_path = tmp_path / "local.sqlite", tmp_path / "ray.sqlite"
    local = ablate(tiny_matrix, local_path, "--workers", "2", "--max-stack", "4", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    started = time.perf_counter()
    remote = ablate(tiny_matrix, ray_path, "--backend", "ray", "--address", ray_cluster.address,
                    "--max-stack", "4", environment=ray_cluster.environment, cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert remote.returncode == 0, remote.stderr
    assert "16 to train in 4 stacks on cpu via Ray at" in remote.stdout
    assert "with 2 CPUs (2 workers)" in remote.stdout
    assert "trained 16 runs" in remote.stdout
    print(f"ray ablate of 16 tiny runs on 2 one-CPU nodes: {seconds:.1f} s wall")

    with Store(local_path, create=False) as store:
        expected = store.runs_frame("tiny")
        expected_epochs = store.epochs_frame("tiny")
    with Store(ray_path, create=False) as store:
        actual = store.runs_frame("tiny")
        actual_epochs = store.epochs_frame("tiny")
    assert list(actual["run_key"]) == list(expected["run_key"])
    assert list(actual["outcome"]) == list(expected["outcome"])
    # One torch thread per stack on both sides: the numbers agree bit for bit.
    assert list(actual["final_accuracy"]) == list(expected["final_accuracy"])
    assert list(actual["final_train_loss"]) == list(expected["final_train_loss"])
    assert list(actual_epochs["test_accuracy"]) == list(expected_epochs["test_accuracy"])
    assert list(actual["confusion"]) == list(expected["confusion"])
    assert set(actual["dataset_md5"]) == set(expected["dataset_md5"])
    assert set(actual["device"]) == {"cpu"}


@pytest.mark.ray
@pytest.mark.mnist
@pytest.mark.slow
def test_killed_worker_keeps_finished_stacks(ray_cluster: RayTestCluster,
                                             tmp_path: Path) -> None:
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(SLOWER_MATRIX)
    store_path = tmp_path / "tiny.sqlite"
    command = [sys.executable, "-m", "mnistbench", "ablate", str(matrix), "--store",
               str(store_path), "--device", "cpu", "--backend", "ray", "--address",
               ray_cluster.address, "--max-stack", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path, env=ray_cluster.environment)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        busy = training_workers(ray_cluster.raylet_pids) if count_runs(store_path) >= 2 else []
        if busy:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
        else:
            time.sleep(0.05)
    stdout, stderr = driver.communicate(timeout=300)
    assert killed is not None, f"the driver ended before a worker was killed:\n{stderr}"
    assert driver.returncode == 2, stdout + stderr
    assert re.search(r"error: 1 of 8 stacks \(2 runs\) failed on the Ray cluster", stderr), stderr
    assert "running the same ablate command again trains the rest" in stderr
    assert count_runs(store_path) == 14

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env=ray_cluster.environment)
    assert resumed.returncode == 0, resumed.stderr
    assert "14 already in" in resumed.stdout
    assert "trained 2 runs" in resumed.stdout
    keys, members, claims, epochs = store_contents(store_path)
    assert len(keys) == len(set(keys)) == 16
    assert set(keys) == members
    assert claims == 0
    assert epochs == 16 * 2


@pytest.mark.ray
@pytest.mark.mnist
@pytest.mark.slow
def test_ray_dry_run_plans_one_shard(ray_cluster: RayTestCluster, tiny_matrix: Path,
                                     tmp_path: Path) -> None:
    store_path = tmp_path / "tiny.sqlite"
    result = ablate(tiny_matrix, store_path, "--dry-run", "--backend", "ray", "--address",
                    ray_cluster.address, "--shard", "2/2", environment=ray_cluster.environment,
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.search(r"= 16 runs \((\d+) in shard 2/2\); 0 already in", result.stdout)
    assert match is not None, result.stdout
    assert re.search(rf"to train: {match.group(1)} runs, .* on cpu via Ray at .* with 2 CPUs",
                     result.stdout)
    assert not store_path.exists()


@pytest.mark.ray
@pytest.mark.mnist
@pytest.mark.slow
def test_cuda_on_cpu_cluster_exits_2(ray_cluster: RayTestCluster, tiny_matrix: Path,
                                     tmp_path: Path) -> None:
    result = ablate(tiny_matrix, tmp_path / "tiny.sqlite", "--backend", "ray", "--address",
                    ray_cluster.address, "--device", "cuda", environment=ray_cluster.environment,
                    cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"error: --device cuda requested but the Ray cluster at \S+ has no GPUs "
                     r"\(2 CPUs\); use --device cpu", result.stderr), result.stderr


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from mnistbench.distributed import RayCluster

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(MnistbenchError,
                       match=r"^the ray backend needs Ray: pip install 'mnistbench\[ray\]'$"):
        RayCluster("127.0.0.1:6379")


@pytest.mark.ray
def test_unreachable_address_fails_fast() -> None:
    pytest.importorskip("ray")
    from mnistbench.distributed import RayCluster

    started = time.perf_counter()
    with pytest.raises(MnistbenchError,
                       match=r"cannot reach the Ray cluster at --address 127\.0\.0\.1:1: .*"
                             r"start one with 'ray start --head'"):
        RayCluster("127.0.0.1:1")
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--address", "127.0.0.1:6379"],
                 r"--address 127\.0\.0\.1:6379 applies only to --backend ray", id="address"),
    pytest.param(["--backend", "ray", "--shard", "3/2"],
                 r"invalid --shard '3/2': shard 3 is out of range 1 to 2", id="shard"),
])
def test_bad_distribution_options_exit_2(tiny_matrix: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture, extra: list[str],
                                         message: str) -> None:
    status = main(["ablate", str(tiny_matrix), "--store", str(tmp_path / "s.sqlite"), *extra])
    assert status == 2
    assert re.search(f"^error: {message}", capsys.readouterr().err)
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_unreachable_cluster_leaves_stores_alone(tiny_matrix: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    new_store = tmp_path / "stores" / "new.sqlite"
    existing_store = tmp_path / "existing.sqlite"
    build_store(existing_store, {"name": "t", "seeds": 2}, lambda cell, seed: Planned()).close()
    before = existing_store.read_bytes()

    for store_path in (new_store, existing_store):
        result = ablate(tiny_matrix, store_path, "--backend", "ray", "--address", "127.0.0.1:1",
                        cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "error: cannot reach the Ray cluster at --address 127.0.0.1:1" in result.stderr

    assert not new_store.parent.exists()
    assert existing_store.read_bytes() == before
    assert count_runs(existing_store) == 2
