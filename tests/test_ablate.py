"""End-to-end runs of ``mnistbench ablate`` on real MNIST, in subprocesses."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import TINY_MATRIX, count_runs, store_contents
from mnistbench.store import Store

pytestmark = [pytest.mark.mnist, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent



def ablate_command(matrix: Path, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mnistbench", "ablate", str(matrix), "--store", str(store),
            *extra]


@pytest.fixture()
def tiny_matrix(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_MATRIX)
    return path


def test_smoke_matrix_trains_plain_mlp_to_85_percent(tmp_path: Path) -> None:
    store_path = tmp_path / "smoke.sqlite"
    result = subprocess.run(ablate_command(REPO / "ablations/smoke.yaml", store_path),
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trained 12 runs" in result.stdout
    with Store(store_path, create=False) as store:
        runs = store.runs_frame("smoke")
        epochs = store.epochs_frame("smoke")
    assert len(runs) == 12
    plain = runs[(runs["activation"] == "sigmoid") & (runs["init"] == "default")]
    assert len(plain) == 3
    assert plain["final_accuracy"].min() >= 0.85
    assert set(plain["outcome"]) == {"converged"}
    assert set(runs["dataset_md5"]) == {runs["dataset_md5"].iloc[0]}
    assert runs["torch_version"].iloc[0].startswith("2.13.0")
    assert set(epochs["epoch"]) == {0, 1, 2}
    assert len(epochs) == 12 * 3
    first = epochs[epochs["epoch"] == 0]
    assert first["train_loss"].isna().all()
    assert (first["test_accuracy"] < 0.3).all()


def test_second_ablate_skips_finished_runs(tiny_matrix: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "tiny.sqlite"
    first = subprocess.run(ablate_command(tiny_matrix, store_path), capture_output=True,
                           text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "trained 16 runs" in first.stdout
    # A dry run keys the runs without loading the data, and finds the same ones stored.
    dry = subprocess.run(ablate_command(tiny_matrix, store_path, "--dry-run"),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"= 16 runs; 16 already in {store_path}" in dry.stdout
    assert "to train: 0 runs" in dry.stdout
    again = subprocess.run(ablate_command(tiny_matrix, store_path, "--workers", "64"),
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "16 already in" in again.stdout
    assert "trained 0 runs" in again.stdout
    assert re.search(r"WARNING .*64 workers share \d+ cores: each trains on one thread, so "
                     r"the extra workers split the stacks smaller", again.stderr), again.stderr
    none = subprocess.run(ablate_command(tiny_matrix, store_path, "--workers", "0"),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert none.returncode == 2
    assert "error: --workers must be at least 1; got 0" in none.stderr
    # A changed setting is a different run and trains anew.
    changed = subprocess.run(ablate_command(tiny_matrix, store_path, "--set", "lr=0.25"),
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert "trained 16 runs" in changed.stdout
    assert count_runs(store_path) == 32


def test_killed_ablate_resumes_with_one_row_per_run(tiny_matrix: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "tiny.sqlite"
    command = ablate_command(tiny_matrix, store_path, "--workers", "1", "--max-stack", "2")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=tmp_path)
    deadline = time.monotonic() + 300
    while count_runs(store_path) < 2 and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    killed_at = count_runs(store_path)
    assert 2 <= killed_at < 16, f"kill landed after {killed_at} runs; expected mid-matrix"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{killed_at} already in" in resumed.stdout
    assert f"trained {16 - killed_at} runs" in resumed.stdout
    keys, members, claims, epochs = store_contents(store_path)
    assert len(keys) == len(set(keys)) == 16
    assert set(keys) == members
    assert claims == 0
    assert epochs == 16 * 2


def test_sigterm_exits_143_and_resumes(tiny_matrix: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "tiny.sqlite"
    command = ablate_command(tiny_matrix, store_path, "--workers", "1", "--max-stack", "2")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while count_runs(store_path) < 2 and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "terminated by SIGTERM; finished runs are kept in the store" in stderr
    assert "Traceback" not in stderr
    stopped_at = count_runs(store_path)
    assert 2 <= stopped_at < 16, f"SIGTERM landed after {stopped_at} runs; expected mid-matrix"
    _, _, claims, _ = store_contents(store_path)
    assert claims == 0

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{stopped_at} already in" in resumed.stdout
    assert f"trained {16 - stopped_at} runs" in resumed.stdout
    keys, members, claims, epochs = store_contents(store_path)
    assert len(keys) == len(set(keys)) == 16
    assert set(keys) == members
    assert claims == 0
    assert epochs == 16 * 2


def test_two_processes_on_one_store_split_the_runs(tiny_matrix: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "tiny.sqlite"
    command = ablate_command(tiny_matrix, store_path, "--workers", "1", "--max-stack", "2")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path)
    outputs = [process.communicate(timeout=600) for process in (first, second)]
    assert first.returncode == 0, outputs[0][1]
    assert second.returncode == 0, outputs[1][1]
    trained = [int(re.search(r"trained (\d+) runs", out).group(1)) for out, _ in outputs]
    assert sum(trained) == 16, trained
    connection = sqlite3.connect(store_path)
    keys = [row[0] for row in connection.execute("SELECT run_key FROM runs")]
    connection.close()
    assert len(keys) == len(set(keys)) == 16


def test_dry_run_trains_nothing(tiny_matrix: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "tiny.sqlite"
    result = subprocess.run(ablate_command(tiny_matrix, store_path, "--dry-run"),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4 cells x 4 seeds = 16 runs" in result.stdout
    assert "to train: 16 runs, 16 model-epochs" in result.stdout
    assert re.search(r"stack +0: +\d+ runs, seeds 0-3, activation=\w+ conv=(true|false) "
                     r"pool=(true|false) width=\d+ epochs=1", result.stdout), result.stdout
    assert not store_path.exists()


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--device", "tpu"], r"invalid --device 'tpu'; expected auto, cpu, cuda or cuda:N", id="device"),
    pytest.param(["--max-stack", "0"], r"--max-stack must be at least 1; got 0", id="max-stack"),
    pytest.param(["--set", "lr=-1"], r"lr", id="override"),
])
def test_bad_options_exit_2(tiny_matrix: Path, tmp_path: Path, extra: list[str],
                            message: str) -> None:
    result = subprocess.run(ablate_command(tiny_matrix, tmp_path / "s.sqlite", *extra),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "s.sqlite").exists()


def test_claimed_runs_reported_apart(tiny_matrix: Path,
                                      tmp_path: Path) -> None:
    """Runs that a live process has claimed are reported apart from the stored ones."""
    import torch

    from mnistbench.data import load_dataset
    from mnistbench.matrix import load_matrix
    from mnistbench.scheduler import key_runs

    store_path = tmp_path / "tiny.sqlite"
    keys = [key for _, _, key in key_runs(load_matrix(tiny_matrix),
                                          load_dataset("mnist", fetch=False).md5,
                                          torch.device("cpu"))]
    with Store(store_path) as store:
        claimed = store.claim(keys[:6], "another-process")  # this test's pid: a live process
    assert len(claimed) == 6
    result = subprocess.run(ablate_command(tiny_matrix, store_path), capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (f"16 runs, 0 already in {store_path}, 6 being trained by another process, "
            f"10 to train") in result.stdout
    assert "trained 10 runs" in result.stdout
