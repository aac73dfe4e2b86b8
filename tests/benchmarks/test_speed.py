"""Engine speed against a plain PyTorch loop and against the machine's matmul rate.

Run with ``make bench`` (CPU) or ``make bench-gpu``. Everything is measured side by
side in one session, with one torch thread, because ``ablate`` runs one worker
process per core with one thread each. The ratios are printed at the end and written
to ``bench/summary.json``; ``docs/benchmarks.md`` records them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mnistbench.benchmark import (
    BENCH_CELLS,
    bench_variants,
    matmul_rate,
    model_epoch_flops,
    plain_loop_seconds,
)
from mnistbench.data import load_dataset
from mnistbench.engine import DeviceData, Member, train_stack
from mnistbench.matrix import Criteria

DEVICE = os.environ.get("MNISTBENCH_BENCH_DEVICE", "cpu")
TRAIN_SUBSET = 10_000 if DEVICE == "cpu" else 60_000  # examples per benchmark epoch
# Both the engine and the plain loop evaluate before and after the epoch. A 1,000-image
# test set keeps that evaluation under 10% of the work, so the figures measure training.
TEST_SUBSET = 1_000
SEEDS = 5  # the engine stack: 5 seeds x 6 variants = 30 runs, like one stack of the default ablation
RESULTS: dict[str, dict] = {}
SUMMARY = Path("bench/summary.json")
PROVENANCE = {"package_version": "bench", "git_commit": "bench",
              "torch_version": torch.__version__, "dataset_md5": "bench"}

pytestmark = pytest.mark.mnist


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    _write_summary()


@pytest.fixture(scope="module")
def data() -> DeviceData:
    full = DeviceData.from_dataset(load_dataset("mnist", fetch=False), DEVICE)
    return DeviceData(full.train_images, full.train_labels, full.test_images[:TEST_SUBSET],
                      full.test_labels[:TEST_SUBSET], full.md5)


def test_matmul_rate(benchmark) -> None:
    rate = benchmark.pedantic(matmul_rate, kwargs={"seconds": 2.0}, rounds=3, iterations=1)
    RESULTS["matmul"] = {"gflops": rate / 1e9}
    assert rate > 1e9


@pytest.mark.parametrize("cell", list(BENCH_CELLS))
def test_engine_seconds_per_model_epoch(benchmark, data: DeviceData, cell: str) -> None:
    settings = replace(BENCH_CELLS[cell], train_subset=TRAIN_SUBSET)
    members = [Member(f"{cell}-{i}-{seed}", seed, variant)
               for seed in range(SEEDS) for i, variant in enumerate(bench_variants(settings))]

    def train() -> None:
        train_stack(members, data, Criteria(), PROVENANCE, DEVICE)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(train, rounds=3, iterations=1, warmup_rounds=1)
    model_epochs = len(members) * TRAIN_SUBSET / 60_000
    seconds = benchmark.stats.stats.median / model_epochs
    flops = model_epoch_flops(settings, test_size=TEST_SUBSET,
                              evaluations=2 * 60_000 // TRAIN_SUBSET)
    RESULTS.setdefault(cell, {}).update(engine_s=seconds, flops_per_model_epoch=flops,
                                        stack=len(members))


@pytest.mark.parametrize("cell", list(BENCH_CELLS))
def test_plain_loop_seconds_per_model_epoch(benchmark, data: DeviceData, cell: str) -> None:
    if DEVICE != "cpu":
        pytest.skip("the plain loop reference is measured on the CPU")
    settings = replace(BENCH_CELLS[cell], train_subset=TRAIN_SUBSET)
    seconds = benchmark.pedantic(plain_loop_seconds, args=(settings, data), rounds=3,
                                 iterations=1, warmup_rounds=1)
    RESULTS.setdefault(cell, {})["loop_s"] = benchmark.stats.stats.median * 60_000 / TRAIN_SUBSET
    assert seconds > 0


def test_thousand_stacked_runs_fit_in_3_gb(tmp_path: Path) -> None:
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


def _write_summary() -> None:
    rate = RESULTS.get("matmul", {}).get("gflops")
    lines = [f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"device {DEVICE}, 1 thread"]
    for cell in BENCH_CELLS:
        entry = RESULTS.get(cell, {})
        if "engine_s" in entry and rate:
            entry["floor_s"] = entry["flops_per_model_epoch"] / (rate * 1e9)
            entry["engine_vs_floor"] = entry["engine_s"] / entry["floor_s"]
        if "engine_s" in entry and "loop_s" in entry:
            entry["loop_vs_engine"] = entry["loop_s"] / entry["engine_s"]
        lines.append(f"{cell:10s} " + " ".join(
            f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
            for key, value in entry.items()))
    SUMMARY.parent.mkdir(exist_ok=True)
    SUMMARY.write_text(json.dumps({"device": DEVICE, "torch": torch.__version__,
                                   "results": RESULTS}, indent=2))
    print("\n" + "\n".join(lines), file=sys.stderr)
