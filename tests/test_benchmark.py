"""Tests of the benchmark helpers: FLOP counts and the gang of worker processes."""

from __future__ import annotations

import pytest

from mnistbench.benchmark import BENCH_CELLS, Gang, model_epoch_flops


def test_mlp_model_epoch_flops() -> None:
    """Forward and backward of 784-100-10 on 60,000 examples, no test evaluation."""
    flops = model_epoch_flops(BENCH_CELLS["mlp"], test_size=0)
    per_example = 2 * (784 * 100 + 100 * 10) + 2 * 784 * 100 + 2 * 2 * 100 * 10
    assert flops == 60_000 * per_example


@pytest.mark.mnist
@pytest.mark.slow
def test_gang_reports_worker_failure() -> None:
    with Gang(1, test_subset=10) as gang:
        rates = gang.run("matmul", seconds=0.1)
        assert len(rates) == 1
        assert rates[0] > 1e8
        with pytest.raises(RuntimeError, match=r"(?s)benchmark task 'matmul' failed in a worker"
                                               r":\n.*KeyError: 'seconds'"):
            gang.run("matmul")
