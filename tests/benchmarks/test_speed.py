"""Engine speed against a plain PyTorch loop and against the machine's matmul rate.

Run with ``make bench`` (CPU) or ``make bench-gpu``. Everything is measured side by
side in one session. On the CPU the engine runs as ``ablate`` runs it: one worker
process per core with one torch thread each, all training at once. Its FLOP floor
uses the matmul rate of the same workers, measured together. The engine skips known
zeros in the first layer and known constants in the convolution front, so a second
floor counts only the terms it multiplies. The plain loop runs in
this process with torch's default thread count, as a hand-written script would. A
one-process, one-thread measurement of the engine against the one-thread matmul
rate is kept beside it. The ratios are printed at the end and written to
``bench/summary.json``; ``docs/benchmarks.md`` records them.

Every figure is the best of its rounds: the fastest time and the highest matmul rate.
Other work on a shared machine only ever slows a round down, so the best round is the
closest estimate of what the code itself costs, for the engine and its references alike.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mnistbench.benchmark import (
    BENCH_CELLS,
    Gang,
    bench_variants,
    engine_seconds,
    matmul_rate,
    model_epoch_flops,
    multiplied_shares,
    plain_loop_seconds,
)
from mnistbench.data import load_dataset
from mnistbench.engine import DeviceData
from mnistbench.scheduler import default_workers

DEVICE = os.environ.get("MNISTBENCH_BENCH_DEVICE", "cpu")
ON_CPU = DEVICE == "cpu"
WORKERS = default_workers(torch.device(DEVICE))  # as many as ablate starts
TRAIN_SUBSET = 10_000 if ON_CPU else 60_000  # examples per benchmark epoch
# Both the engine and the plain loop evaluate before and after the epoch. A 1,000-image
# test set keeps that evaluation under 10% of the work, so the figures measure training.
TEST_SUBSET = 1_000
# Seeds per worker: on the CPU 5 seeds x 6 variants = 30 runs per worker, like one stack
# of the default ablation; on a GPU one large stack of 50 x 6 = 300 runs.
SEEDS = 5 if ON_CPU else 50
MATMUL_SIZE = 1024 if ON_CPU else 8192
DEFAULT_THREADS = torch.get_num_threads()
RESULTS: dict[str, dict] = {}
SUMMARY = Path("bench/summary.json")

pytestmark = pytest.mark.mnist


@contextmanager
def threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    _write_summary()


@pytest.fixture(scope="module")
def gang() -> Iterator[Gang | None]:
    if not ON_CPU:
        yield None
        return
    with Gang(WORKERS, test_subset=TEST_SUBSET) as workers:
        yield workers


@pytest.fixture(scope="module")
def data() -> DeviceData:
    full = DeviceData.from_dataset(load_dataset("mnist", fetch=False), DEVICE)
    return DeviceData(full.train_images, full.train_labels, full.test_images[:TEST_SUBSET],
                      full.test_labels[:TEST_SUBSET], full.md5)


def settings_of(cell: str):
    return replace(BENCH_CELLS[cell], train_subset=TRAIN_SUBSET)


def test_matmul_rate(benchmark, gang: Gang | None) -> None:
    """The float32 matmul rate of all workers together: the floor's denominator."""
    rates = []

    def measure() -> None:
        if gang is None:
            rates.append(matmul_rate(size=MATMUL_SIZE, seconds=2.0, device=DEVICE))
        else:
            rates.append(sum(gang.run("matmul", seconds=2.0)))

    benchmark.pedantic(measure, rounds=3, iterations=1)
    RESULTS["matmul"] = {"gflops": max(rates) / 1e9, "workers": WORKERS}
    assert max(rates) > 1e9


@pytest.mark.skipif(not ON_CPU, reason="the one-thread reference is measured on the CPU")
def test_matmul_rate_one_thread(benchmark) -> None:
    rates = []
    with threads(1):
        benchmark.pedantic(lambda: rates.append(matmul_rate(seconds=2.0)), rounds=3,
                           iterations=1)
    RESULTS["matmul_one_thread"] = {"gflops": max(rates) / 1e9}
    assert max(rates) > 1e9


@pytest.mark.parametrize("cell", list(BENCH_CELLS))
def test_engine_seconds_per_model_epoch(benchmark, gang: Gang | None, data: DeviceData,
                                        cell: str) -> None:
    settings = settings_of(cell)
    if gang is None:
        benchmark.pedantic(engine_seconds, args=(settings, data, range(SEEDS), DEVICE),
                           rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(gang.run, args=("engine",),
                           kwargs={"settings": settings, "seeds_per_worker": SEEDS},
                           rounds=5, iterations=1, warmup_rounds=1)
    runs = WORKERS * SEEDS * len(bench_variants(settings))
    seconds = benchmark.stats.stats.min / (runs * TRAIN_SUBSET / 60_000)
    shares = multiplied_shares(settings, data, range(WORKERS * SEEDS)) if ON_CPU else (1.0, 1.0)
    RESULTS.setdefault(cell, {}).update(
        engine_s=seconds, runs=runs, flops=_flops(settings),
        multiplied_flops=_flops(settings, shares), first_layer_shares=shares)
    assert seconds > 0


@pytest.mark.skipif(not ON_CPU, reason="the one-process reference is measured on the CPU")
@pytest.mark.parametrize("cell", list(BENCH_CELLS))
def test_engine_one_process_one_thread(benchmark, data: DeviceData, cell: str) -> None:
    settings = settings_of(cell)
    with threads(1):
        benchmark.pedantic(engine_seconds, args=(settings, data, range(SEEDS)),
                           rounds=2, iterations=1, warmup_rounds=1)
    runs = SEEDS * len(bench_variants(settings))
    seconds = benchmark.stats.stats.min / (runs * TRAIN_SUBSET / 60_000)
    RESULTS.setdefault(cell, {})["engine_one_thread_s"] = seconds
    assert seconds > 0


@pytest.mark.parametrize("cell", list(BENCH_CELLS))
def test_plain_loop_seconds_per_model_epoch(benchmark, data: DeviceData, cell: str) -> None:
    with threads(DEFAULT_THREADS):
        seconds = benchmark.pedantic(plain_loop_seconds, args=(settings_of(cell), data),
                                     kwargs={"device": DEVICE}, rounds=5, iterations=1,
                                     warmup_rounds=1)
    RESULTS.setdefault(cell, {})["loop_s"] = benchmark.stats.stats.min * 60_000 / TRAIN_SUBSET
    RESULTS[cell]["loop_threads"] = DEFAULT_THREADS if ON_CPU else 0
    assert seconds > 0


@pytest.mark.skipif(not ON_CPU, reason="measures the resident memory of a CPU process")
def test_thousand_stacked_runs_fit_in_3_gb() -> None:
    """Peak memory of a process that trains 1,000 MLP runs of width 100 in one stack."""
    script = textwrap.dedent("""
        import resource, torch
        from dataclasses import replace
        from mnistbench.data import load_dataset
        from mnistbench.engine import DeviceData, Member, train_stack
        from mnistbench.matrix import Criteria, Settings
        torch.set_num_threads(1)
        full = DeviceData.from_dataset(load_dataset("mnist", fetch=False), "cpu")
        data = DeviceData(full.train_images, full.train_labels, full.test_images[:500],
                          full.test_labels[:500], full.md5)
        base = Settings(width=100, batch_size=128, epochs=1, train_subset=1280)
        members = [Member(f"{s}-{v}", s, replace(base, lr=0.01 * (v + 1)))
                   for s in range(10) for v in range(100)]
        train_stack(members, data, Criteria(), {"package_version": "", "git_commit": "",
                    "torch_version": "", "dataset_md5": ""})
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.strip().splitlines()[-1])
    RESULTS["memory"] = {"runs": 1000, "width": 100, "peak_gb": peak / 1e9}
    assert peak < 3e9, f"peak memory {peak / 1e9:.2f} GB for 1,000 stacked runs; limit 3 GB"


def _flops(settings, shares: tuple[float, float] = (1.0, 1.0)) -> int:
    """FLOPs of one model-epoch as benchmarked: 60,000 training examples, plus the
    evaluations of the test subset that the benchmark's 10,000-example epochs add up to.
    ``shares`` count only the first layer's terms that the engine multiplies."""
    return model_epoch_flops(settings, test_size=TEST_SUBSET,
                             evaluations=2 * 60_000 // TRAIN_SUBSET, shares=shares)


def _write_summary() -> None:
    rate = RESULTS.get("matmul", {}).get("gflops")
    one_thread = RESULTS.get("matmul_one_thread", {}).get("gflops")
    for cell in BENCH_CELLS:
        entry = RESULTS.get(cell, {})
        if "engine_s" in entry and rate:
            entry["floor_s"] = entry["flops"] / (rate * 1e9)
            entry["engine_vs_floor"] = entry["engine_s"] / entry["floor_s"]
            entry["multiplied_floor_s"] = entry["multiplied_flops"] / (rate * 1e9)
            entry["engine_vs_multiplied_floor"] = entry["engine_s"] / entry["multiplied_floor_s"]
        if "engine_s" in entry and "loop_s" in entry:
            entry["loop_vs_engine"] = entry["loop_s"] / entry["engine_s"]
        if "engine_one_thread_s" in entry and "flops" in entry and one_thread:
            entry["floor_one_thread_s"] = entry["flops"] / (one_thread * 1e9)
            entry["engine_one_thread_vs_floor"] = (entry["engine_one_thread_s"]
                                                   / entry["floor_one_thread_s"])
    SUMMARY.parent.mkdir(exist_ok=True)
    SUMMARY.write_text(json.dumps({
        "device": DEVICE, "torch": torch.__version__, "workers": WORKERS,
        "cpu": platform.processor() or platform.machine(), "results": RESULTS,
    }, indent=2))
