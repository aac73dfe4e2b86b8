"""The compiled front kernels: their build, and the same numbers as torch's operations."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace

import pytest
import torch

from mnistbench import native
from mnistbench.backprop import gradients, member_losses
from mnistbench.engine import train_stack
from mnistbench.evaluation import evaluate
from mnistbench.features import Band, zero_skipping_bands
from mnistbench.matrix import Criteria, Settings, parse_matrix
from mnistbench.model import Block
from mnistbench.scheduler import key_runs
from mnistbench.windows import Packing, WindowLayout, packed_width

from test_engine import PROVENANCE, assert_stack_equals_alone, members_for, ragged_dataset

HAS_COMPILER = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


@pytest.fixture
def torch_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the convolution front in torch's operations, as on a machine without a compiler."""
    monkeypatch.setattr(native, "available", lambda: False)


@needs_compiler
def test_kernels_build_once_and_load(tmp_path) -> None:
    path = native.build(tmp_path)
    assert path.parent == tmp_path
    assert path.stat().st_size > 0
    built = path.stat().st_mtime_ns
    assert native.build(tmp_path) == path
    assert path.stat().st_mtime_ns == built  # the second call found the first build
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.stem + ".sha256", path.name]
    assert path.stat().st_mode & 0o777 == 0o755
    assert native.available()


@needs_compiler
@pytest.mark.parametrize("damage", ["cut off", "overwritten", "no checksum"])
def test_damaged_library_is_built_again(tmp_path, damage: str) -> None:
    """Loading a cut-off shared library can crash the process, so it is never loaded."""
    path = native.build(tmp_path)
    whole = path.read_bytes()
    # The damaged file replaces the library, as a copy would. Writing into the file
    # itself would cut off the library this process has loaded and crash it.
    damaged = tmp_path / "damaged"
    if damage == "cut off":
        damaged.write_bytes(whole[:20_000])
        damaged.replace(path)
    elif damage == "overwritten":
        damaged.write_bytes(b"not a shared library")
        damaged.replace(path)
    else:
        path.with_suffix(".sha256").unlink()
    assert native.build(tmp_path) == path
    assert path.read_bytes() == whole
    native.load(path)


def test_build_without_a_compiler_says_so(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(native.BuildError, match=r"no C compiler found \(\$CC, cc or gcc\)"):
        native.build(tmp_path)


def test_build_reports_a_failing_compiler(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", shutil.which("false"))
    with pytest.raises(native.BuildError,
                       match=r"false failed to build the native kernels \(exit 1\)$"):
        native.build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_build_rejects_an_empty_library(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", shutil.which("true"))
    with pytest.raises(native.BuildError, match=r"true wrote no loadable library"):
        native.build(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_build_reports_a_missing_compiler_path(tmp_path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native.BuildError, match=r"could not build the native kernels in .*no-such-cc"):
        native.build(tmp_path)


@needs_compiler
def test_compiler_command_may_carry_flags(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"{compiler} -O1")
    path = native.build(tmp_path)
    monkeypatch.setenv("CC", compiler)
    assert native.build(tmp_path) != path  # the command is part of the library's name
    native.load(path)


def test_stale_temporary_files_are_removed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, fresh = tmp_path / "tmpold.so", tmp_path / "tmpfresh.so"
    old.write_bytes(b"")
    fresh.write_bytes(b"")
    os.utime(old, (0, 0))
    monkeypatch.setenv("CC", shutil.which("false"))
    with pytest.raises(native.BuildError):
        native.build(tmp_path)
    assert not old.exists()
    assert fresh.exists()  # maybe another worker's build in progress


def test_failed_build_falls_back_with_a_warning(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", shutil.which("false"))
    monkeypatch.setenv("MNISTBENCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(native.NATIVE_ENV, "")  # restored after the test
    native._loaded.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mnistbench.native"):
            assert not native.available()
        assert "failed to build the native kernels" in caplog.text
        assert "uses torch's operations instead" in caplog.text
        assert "set MNISTBENCH_NATIVE=0" in caplog.text
        # Worker processes started from here skip the build, matching the run keys.
        assert os.environ[native.NATIVE_ENV] == "0"
    finally:
        native._loaded.cache_clear()


@pytest.mark.parametrize("setting, expected", [
    ("0", False), ("off", False), ("False", False), ("no", False),
    ("1", True), ("on", True), ("", True), ("yes", True),
])
def test_native_switch(setting: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.NATIVE_ENV, setting)
    assert native.enabled() is expected


def test_native_switch_warns_on_other_values(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(native.NATIVE_ENV, "maybe")
    with caplog.at_level(logging.WARNING, logger="mnistbench.native.build"):
        assert native.enabled()
    assert "MNISTBENCH_NATIVE='maybe' is not one of 0, false, off, no (off)" in caplog.text


def test_switched_off_kernels_are_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    native._loaded.cache_clear()
    try:
        assert not native.available()
    finally:
        native._loaded.cache_clear()


def _block(settings: Settings, order: torch.Tensor | None = None) -> Block:
    """Two seeds of three runs each."""
    variants = [settings, replace(settings, init="kaiming"), replace(settings, init="xavier")]
    return Block(variants * 2, [0, 1], "cpu", order)


def _step(block: Block, windows: torch.Tensor, labels: torch.Tensor, bands):
    trace = block.forward(windows, bands=bands)
    losses, logit_grad = member_losses(trace.logits, labels, "cross_entropy", with_grad=True)
    grads = gradients(block, trace, logit_grad)
    grads.materialize(block)
    return trace.logits, grads.params


def _batches(settings: Settings):
    """Two seeds' batches of ragged images, sorted by extent, and their bands."""
    data = ragged_dataset()
    arranged = data.arranged_inputs(True, settings.pool)
    index = torch.stack([torch.arange(0, 16), torch.arange(100, 116)])
    extents, by_extent = arranged.extent[index].sort(dim=1, stable=True)
    index = index.gather(1, by_extent)
    bands = [zero_skipping_bands(e) for e in extents.tolist()]
    assert any(len(b) > 1 for b in bands)
    labels = data.train_labels[index].repeat_interleave(3, dim=0)
    return arranged, arranged.train[index], labels, bands


@needs_compiler
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "gelu"])
@pytest.mark.parametrize("pool", [False, True], ids=["conv", "conv-pool"])
@pytest.mark.parametrize("skipping", [True, False], ids=["bands", "dense"])
def test_native_front_matches_torch_operations(activation: str, pool: bool, skipping: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits and every gradient agree with the torch front to float32 rounding."""
    settings = Settings(activation=activation, width=12, batch_size=16, conv=True, pool=pool)
    arranged, windows, labels, bands = _batches(settings)
    block = _block(settings, arranged.order)
    bands = bands if skipping else None
    assert native.available()
    logits, grads = _step(block, windows, labels, bands)
    monkeypatch.setattr(native, "available", lambda: False)
    expected_logits, expected = _step(block, windows, labels, bands)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert grads["conv_weight"].abs().sum() > 0


@needs_compiler
@pytest.mark.parametrize("pool", [False, True], ids=["conv", "conv-pool"])
def test_native_evaluation_matches_torch_operations(pool: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(activation="relu", width=12, conv=True, pool=pool)
    data = ragged_dataset()
    arranged = data.arranged_inputs(True, pool)
    block = _block(settings, arranged.order)
    args = (block, arranged.test, arranged.test_labels, "relu")
    result = evaluate(*args, extents=arranged.test_extent)
    monkeypatch.setattr(native, "available", lambda: False)
    expected = evaluate(*args, extents=arranged.test_extent)
    # One test example of 100 may flip where two logits nearly tie.
    torch.testing.assert_close(result["accuracy"], expected["accuracy"], rtol=0, atol=0.011)
    torch.testing.assert_close(result["unit_fraction"], expected["unit_fraction"])
    assert int(result["counts"].sum()) == block.members * arranged.test.shape[0]


@needs_compiler
def test_pooled_front_keeps_nan_like_torch_maximum() -> None:
    """A run whose taps are NaN gets NaN outputs, so its loss shows that it diverged."""
    layout = WindowLayout.of(pool=True)
    packings = [Packing.of((Band(0, 0, 40), Band(2, 40, 45)), 4, layout.count)]
    width = packed_width(packings)
    windows = torch.randint(0, 256, (1, 4, 4 * layout.count), dtype=torch.uint8)
    taps = torch.tensor([[0.5, -0.25, 1.0], [float("nan"), 0.0, 0.0]])
    length = packings[0].length
    for activation in (None, "relu"):
        out = torch.full((2, width), 7.0)
        native.front_forward(windows, layout, packings, taps, torch.tensor([[-0.8], [0.0]]),
                             "max", out, activation=activation)
        assert out[1, :length].isnan().all()
        assert torch.isfinite(out[0, :length]).all()
        assert out[:, length:].eq(0).all()  # zeros past the packed length
    assert out[0, :length].min() == 0.0  # ReLU clipped the negative outputs


@needs_compiler
@pytest.mark.parametrize("base", [
    pytest.param(Settings(activation="sigmoid", width=32, epochs=2, batch_size=8, lr=0.5,
                          conv=True, pool=True), id="conv-pool"),
    pytest.param(Settings(activation="tanh", width=32, epochs=2, batch_size=8, lr=0.5,
                          conv=True), id="conv-tanh"),
])
def test_torch_front_stack_equals_alone(base: Settings, torch_front: None) -> None:
    """Without the kernels, stacking still changes no bit of a run."""
    assert not native.runs_on(_block(base).device)
    assert_stack_equals_alone(base, ragged_dataset())


@needs_compiler
def test_front_kernels_change_only_low_bits_of_training(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    settings = Settings(activation="sigmoid", width=16, epochs=1, batch_size=8, lr=0.5,
                        conv=True, pool=True)
    members = members_for([settings, replace(settings, init="kaiming")], seeds=[0])
    data = ragged_dataset()
    with_kernels = train_stack(members, data, Criteria(), PROVENANCE)
    monkeypatch.setattr(native, "available", lambda: False)
    without = train_stack(members, data, Criteria(), PROVENANCE)
    for a, b in zip(with_kernels, without):
        assert a.final_train_loss == pytest.approx(b.final_train_loss, rel=1e-4)
        assert a.final_accuracy == pytest.approx(b.final_accuracy, abs=0.02)


def test_run_keys_tell_the_kernels_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store never mixes convolution runs trained with and without the kernels."""
    matrix = parse_matrix({"name": "keys", "seeds": 2, "factors": {"conv": [False, True]}})
    cpu = torch.device("cpu")
    monkeypatch.setattr(native, "available", lambda: True)
    with_kernels = key_runs(matrix, "md5", cpu)
    monkeypatch.setattr(native, "available", lambda: False)
    without = key_runs(matrix, "md5", cpu)
    for (cell, seed, key), (_, _, other) in zip(with_kernels, without):
        if cell.settings.conv:
            assert key != other, (cell.cell_id, seed)
        else:
            assert key == other, (cell.cell_id, seed)
    on_gpu = key_runs(matrix, "md5", torch.device("cuda"))
    assert {key for _, _, key in on_gpu}.isdisjoint(key for _, _, key in without)



@needs_compiler
def test_run_keys_tell_kernel_builds_apart(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiler flags can change the kernels' numbers, so they change the run keys too."""
    matrix = parse_matrix({"name": "keys", "seeds": 2, "factors": {"conv": [True]}})
    compiler = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("MNISTBENCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    native._loaded.cache_clear()
    try:
        plain = key_runs(matrix, "md5", torch.device("cpu"))
        assert native.kernels_id().startswith("native-")
        monkeypatch.setenv("CC", f"{compiler} -O1")
        native._loaded.cache_clear()
        flagged = key_runs(matrix, "md5", torch.device("cpu"))
    finally:
        native._loaded.cache_clear()
    assert len(plain) == 2
    for (_, _, key), (_, _, other) in zip(plain, flagged):
        assert key != other

def _band_case(hidden: int):
    """Two seeds of two runs whose batches of 11 examples have three bands and two, with
    random packed inputs, weights and output gradients."""
    windows, batch, variants = 50, 11, 2
    packings = [Packing.of((Band(0, 0, 21), Band(3, 21, 38), Band(6, 38, 41)), batch, windows),
                Packing.of((Band(0, 0, 9), Band(1, 9, 30)), batch, windows)]
    members = len(packings) * variants
    generator = torch.Generator().manual_seed(hidden)
    packed = torch.randn(members, packed_width(packings), generator=generator)
    weight = torch.randn(members, windows, hidden, generator=generator)
    grad = torch.randn(members, batch, hidden, generator=generator)
    return packings, variants, packed, weight, grad


def _member_bands(packings, variants):
    """Yield each member and each of its bands with its block's offsets."""
    for s, packing in enumerate(packings):
        for v in range(variants):
            for band, low, high in zip(packing.bands, packing.offsets, packing.offsets[1:]):
                yield s * variants + v, band, low, high


@needs_compiler
@pytest.mark.parametrize("hidden", [1, 8, 13, 100])
def test_band_kernels_match_torch_products(hidden: int) -> None:
    packings, variants, packed, weight, grad = _band_case(hidden)
    batch = packings[0].batch

    out = torch.full(grad.shape, float("nan"))  # the first band writes every example
    expected = torch.zeros(grad.shape, dtype=torch.float64)
    native.bands_forward(packed, weight, out, packings)
    for m, (first, start, stop), low, high in _member_bands(packings, variants):
        block = packed[m, low:high].view(batch - first, stop - start).double()
        expected[m, first:] += block @ weight[m, start:stop].double()
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)

    inputs_grad = torch.full_like(packed, float("nan"))
    expected = torch.zeros(packed.shape, dtype=torch.float64)  # zeros past the bands
    native.bands_input_gradient(grad, weight, inputs_grad, packings)
    for m, (first, start, stop), low, high in _member_bands(packings, variants):
        product = grad[m, first:].double() @ weight[m, start:stop].double().t()
        expected[m, low:high] = product.flatten()
    torch.testing.assert_close(inputs_grad, expected.float(), rtol=1e-5, atol=1e-5)

    updated = weight.clone()
    expected = weight.double()
    native.bands_weight_gradient(updated, packed, grad, packings, -0.5)
    for m, (first, start, stop), low, high in _member_bands(packings, variants):
        block = packed[m, low:high].view(batch - first, stop - start).double()
        expected[m, start:stop] -= 0.5 * block.t() @ grad[m, first:].double()
    torch.testing.assert_close(updated, expected.float(), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_band_kernels_stack_equals_alone() -> None:
    packings, variants, packed, weight, grad = _band_case(13)
    m = 3  # seed 1, run 1
    alone = ([packings[1]], slice(m, m + 1))
    stacked = (packings, slice(None))
    results = []
    for chosen, runs in (stacked, alone):
        out = torch.empty(grad[runs].shape)
        native.bands_forward(packed[runs], weight[runs].contiguous(), out, chosen)
        inputs_grad = torch.empty(packed[runs].shape)
        native.bands_input_gradient(grad[runs].contiguous(), weight[runs].contiguous(),
                                    inputs_grad, chosen)
        updated = weight[runs].clone()
        native.bands_weight_gradient(updated, packed[runs], grad[runs], chosen, -1.0)
        results.append((out[-1], inputs_grad[-1], updated[-1]))
    for stacked_result, alone_result in zip(*results):
        assert torch.equal(stacked_result, alone_result)


@needs_compiler
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_hidden_kernel_matches_torch(activation: str) -> None:
    """The bias, the activation and dropout in one pass: ReLU and dropout bit for bit, the
    sigmoid to float32 rounding."""
    seeds, variants, batch, hidden = 2, 3, 5, 13
    members = seeds * variants
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(members, batch, hidden, generator=generator) * 8
    pre[0, 0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 100.0, -100.0, 0.0])
    bias = torch.randn(members, hidden, generator=generator)
    uniform = torch.rand(seeds, batch, hidden, generator=generator)
    drop = torch.tensor([0.0, 0.5, 0.2] * seeds)
    expected = getattr(torch, activation)(pre + bias[:, None])
    expected_keep = (uniform.repeat_interleave(variants, dim=0) >= drop[:, None, None]).float()
    expected_keep *= 1.0 / (1.0 - drop[:, None, None])

    hidden_units, keep, dropped = native.hidden_forward(pre.clone(), bias, activation,
                                                        uniform, drop)
    if activation == "relu":
        assert torch.equal(hidden_units.nan_to_num(-1.0), expected.nan_to_num(-1.0))
    else:
        torch.testing.assert_close(hidden_units, expected, rtol=3e-7, atol=1e-37,
                                   equal_nan=True)
    assert hidden_units[0, 0, 0].isnan()
    assert hidden_units[0, 0, 1] == (float("inf") if activation == "relu" else 1.0)
    assert 0.0 <= hidden_units[0, 0, 2] < 1e-37  # a sigmoid below -87 is not quite 0
    assert torch.equal(keep, expected_keep)
    assert torch.equal(dropped.nan_to_num(-1.0), (hidden_units * keep).nan_to_num(-1.0))

    without = native.hidden_forward(pre.clone(), bias, activation, None, drop)
    assert without[1] is None
    assert without[2] is without[0]
    assert torch.equal(without[0].nan_to_num(-1.0), hidden_units.nan_to_num(-1.0))
