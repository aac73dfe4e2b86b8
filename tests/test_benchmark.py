"""Tests of the benchmark helpers: FLOP counts and the gang of worker processes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mnistbench.benchmark import BENCH_CELLS, Gang, model_epoch_flops, multiplied_shares
from mnistbench.engine import DeviceData


def test_mlp_model_epoch_flops() -> None:
    """Forward and backward of 784-100-10 on 60,000 examples, no test evaluation."""
    flops = model_epoch_flops(BENCH_CELLS["mlp"], test_size=0)
    per_example = 2 * (784 * 100 + 100 * 10) + 2 * 784 * 100 + 2 * 2 * 100 * 10
    assert flops == 60_000 * per_example


def test_model_epoch_flops_with_shares() -> None:
    """Only the multiplied share of the first layer's terms is counted."""
    settings = BENCH_CELLS["mlp"]
    first = 2 * 784 * 100
    dense = model_epoch_flops(settings, train_size=10, test_size=4)
    half = model_epoch_flops(settings, train_size=10, test_size=4, shares=(0.5, 0.25))
    assert dense - half == 10 * 2 * first * 0.5 + 4 * first * 0.75


def test_multiplied_shares_replay_the_bands() -> None:
    """Training images lit on their first 100 pixels; test images on 100 or 200."""
    train = torch.zeros(8, 784, dtype=torch.uint8)
    train[:, :100] = 1
    test = train.clone()
    test[1::2, :200] = 1
    labels = torch.zeros(8, dtype=torch.long)
    data = DeviceData(train, labels, test, labels, "synthetic")
    settings = replace(BENCH_CELLS["mlp"], batch_size=4, epochs=2)
    train_share, test_share = multiplied_shares(settings, data, range(3))
    assert train_share == pytest.approx(100 / 784)  # every batch: one band (0, 0, 100)
    # One slab of 8: bands (0, 0, 100) and (4, 100, 200), whose first row is aligned
    # down to 0, a multiple of the evaluation's tile of 64.
    assert test_share == pytest.approx((8 * 100 + 8 * 100) / (8 * 784))
    # With the front the shares count windows: pixels 0-99 light the first 100 of 782
    # three-pixel windows and the first 50 of 391 pooled ones.
    conv_shares = multiplied_shares(replace(settings, conv=True), data, range(1))
    assert conv_shares == pytest.approx((100 / 782, 16 * 100 / (8 * 782)))
    pooled_shares = multiplied_shares(replace(settings, conv=True, pool=True), data, range(1))
    assert pooled_shares == pytest.approx((50 / 391, 16 * 50 / (8 * 391)))


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
