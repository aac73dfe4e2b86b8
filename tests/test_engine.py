"""Tests of the stacked engine on small datasets built in the test."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mnistbench import evaluation, features, native, windows
from mnistbench import model as model_module
from mnistbench.engine import DeviceData, Member, _grad_norms, train_stack
from mnistbench.matrix import Criteria, Settings
from mnistbench.backprop import gradients, member_losses
from mnistbench.scheduler import plan_stacks, train_safely
from mnistbench.seeds import generator

PROVENANCE = {"package_version": "test", "git_commit": "test", "torch_version": "test",
              "dataset_md5": "synthetic"}


def band_dataset(train_size: int = 1024, test_size: int = 500, *, train_label: int | None = None
                 ) -> DeviceData:
    """Digits drawn as bright bands: class k lights pixels 78k..78k+77, plus noise.

    With ``train_label`` every training example carries that label, which teaches
    any model to predict that one class.
    """
    generator = torch.Generator().manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 784), generator=generator)
        for k in range(10):
            rows = labels == k
            images[rows, 78 * k:78 * k + 78] += 180
        return images.clamp(0, 255).to(torch.uint8), labels

    train_images, train_labels = make(train_size)
    test_images, test_labels = make(test_size)
    if train_label is not None:
        train_labels = torch.full_like(train_labels, train_label)
    return DeviceData(train_images, train_labels, test_images, test_labels, "synthetic")


def ragged_dataset(train_size: int = 256, test_size: int = 100) -> DeviceData:
    """Images lit only up to a length drawn per example, mostly short, and dark after it.

    Class k lights pixels 20k..20k+19 more brightly. In a small batch the last lit
    pixel varies a lot, so the engine's first-layer bands vary too.
    """
    generator = torch.Generator().manual_seed(1)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 10
        images = torch.randint(0, 120, (n, 784), generator=generator)
        for k in range(10):
            images[labels == k, 20 * k:20 * k + 20] += 130
        lengths = 200 + (584 * torch.rand(n, generator=generator) ** 6).long()
        images[torch.arange(784) >= lengths[:, None]] = 0
        return images.to(torch.uint8), labels

    train_images, train_labels = make(train_size)
    test_images, test_labels = make(test_size)
    return DeviceData(train_images, train_labels, test_images, test_labels, "synthetic")


def members_for(variants: list[Settings], seeds: list[int]) -> list[Member]:
    return [Member(f"run{i}-{s}", s, settings)
            for i, settings in enumerate(variants) for s in seeds]


BASE = Settings(activation="sigmoid", width=32, epochs=2, batch_size=32, lr=0.5)


@pytest.mark.parametrize("base", [
    pytest.param(BASE, id="mlp"),
    pytest.param(replace(BASE, conv=True), id="conv"),
    pytest.param(replace(BASE, conv=True, pool=True), id="conv-pool"),
    pytest.param(replace(BASE, pool=True, activation="relu"), id="pool-relu"),
    pytest.param(replace(BASE, optimizer="adam", lr=0.01), id="adam"),
    pytest.param(replace(BASE, conv=True, pool=True, activation="gelu", loss="mse"),
                 id="conv-pool-gelu-mse"),
    pytest.param(replace(BASE, conv=True, activation="tanh", weight_decay=0.01),
                 id="conv-tanh-decay"),
])
def test_stacked_run_equals_run_alone(base: Settings) -> None:
    assert_stack_equals_alone(base, band_dataset())


@pytest.mark.parametrize("base", [
    pytest.param(replace(BASE, batch_size=8), id="mlp"),
    pytest.param(replace(BASE, batch_size=8, pool=True, activation="relu"), id="pool-relu"),
    pytest.param(replace(BASE, batch_size=8, conv=True), id="conv"),
    pytest.param(replace(BASE, batch_size=8, conv=True, activation="tanh"), id="conv-tanh"),
    pytest.param(replace(BASE, batch_size=8, conv=True, pool=True), id="conv-pool"),
    pytest.param(replace(BASE, batch_size=8, conv=True, pool=True, activation="gelu"),
                 id="conv-pool-gelu"),
])
def test_stack_equals_alone_skipping_zeros(base: Settings) -> None:
    """The first layer's bands differ per batch, and stacking still changes nothing."""
    data = ragged_dataset()
    extent = data.arranged_inputs(base.conv, base.pool).extent
    feature_count = base.input_features()
    order = torch.randperm(256, generator=generator(0, "data"))
    in_use = [int(extent[order[i:i + 8]].max()) for i in range(0, 256, 8)]
    assert min(in_use) < 0.75 * feature_count
    assert max(in_use) > 0.9 * feature_count
    assert_stack_equals_alone(base, data)


def assert_stack_equals_alone(base: Settings, data: DeviceData) -> None:
    variants = [
        base,
        replace(base, init="xavier"),
        replace(base, dropout=0.5),
        replace(base, init="kaiming", dropout=0.2),
    ]
    if base.optimizer == "sgd":
        variants.append(replace(base, momentum=0.9, lr=0.1))
    members = members_for(variants, seeds=[0, 1])[:8]
    stacked = train_stack(members, data, Criteria(), PROVENANCE)
    assert len(stacked) == len(members)
    for member, together in zip(members, stacked):
        alone, = train_stack([member], data, Criteria(), PROVENANCE)
        assert together.run_key == member.run_key
        assert len(together.epochs) == len(alone.epochs) == base.epochs + 1
        # Bit for bit: a run's numbers must not depend on the runs it was stacked with.
        for a, b in zip(together.epochs, alone.epochs):
            assert a.train_loss == b.train_loss, member
            assert a.test_accuracy == b.test_accuracy, member
            assert a.grad_norm == b.grad_norm, member
            assert a.prediction_counts == b.prediction_counts, member
            assert a.dead_fraction == b.dead_fraction, member
            assert a.saturated_fraction == b.saturated_fraction, member
        assert together.confusion == alone.confusion


def test_same_run_twice_is_identical() -> None:
    data = band_dataset()
    member = Member("k", 3, replace(BASE, dropout=0.3))
    first, = train_stack([member], data, Criteria(), PROVENANCE)
    second, = train_stack([member], data, Criteria(), PROVENANCE)
    assert [e.train_loss for e in first.epochs] == [e.train_loss for e in second.epochs]
    assert first.confusion == second.confusion


def test_seeds_give_different_runs() -> None:
    data = band_dataset()
    a, b = train_stack(members_for([BASE], seeds=[0, 1]), data, Criteria(), PROVENANCE)
    assert a.epochs[1].train_loss != b.epochs[1].train_loss


def test_converging_run_is_classified_converged() -> None:
    result, = train_stack([Member("k", 0, BASE)], band_dataset(), Criteria(0.9, 0.9),
                          PROVENANCE)
    assert result.outcome == "converged"
    assert result.final_accuracy >= 0.9
    assert result.collapse_class is None
    assert sum(map(sum, result.confusion)) == 500
    assert result.epochs[0].train_loss is None
    assert result.epochs[-1].saturated_fraction is not None
    assert result.epochs[-1].dead_fraction is None


def test_one_label_training_collapses_to_that_class() -> None:
    data = band_dataset(train_label=7)
    result, = train_stack([Member("k", 0, BASE)], data, Criteria(0.9, 0.9), PROVENANCE)
    assert result.outcome == "collapsed"
    assert result.collapse_class == 7
    assert result.max_class_share == pytest.approx(1.0)
    assert result.epochs[-1].prediction_counts[7] == 500


def test_huge_learning_rate_diverges_without_stopping_batch_mates() -> None:
    data = band_dataset()
    exploding = replace(BASE, activation="relu", init="large_normal", lr=1e30)
    members = [Member("bad", 0, exploding), Member("good", 0, replace(exploding, lr=0.05,
                                                                       init="default"))]
    # Both share a seed and structure, so they train in one block of one stack.
    assert len(plan_stacks(members, max_stack=8)) == 1
    bad, good = train_stack(members, data, Criteria(0.9, 0.9), PROVENANCE)
    assert bad.outcome == "diverged"
    assert bad.final_accuracy is None
    assert bad.epochs[-1].nonfinite
    assert math.isnan(bad.epochs[-1].train_loss)
    assert good.outcome == "converged"
    assert all(not e.nonfinite for e in good.epochs)
    assert len(good.epochs) == BASE.epochs + 1


def test_crash_of_one_run_keeps_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    real_init = model_module.init_member

    def init_failing_for_seed_5(settings: Settings, seed: int) -> dict:
        if seed == 5:
            raise RuntimeError("simulated failure while drawing weights")
        return real_init(settings, seed)

    monkeypatch.setattr(model_module, "init_member", init_failing_for_seed_5)
    members = members_for([BASE], seeds=[4, 5, 6])
    results = train_safely(members, band_dataset(), Criteria(0.9, 0.9), PROVENANCE,
                           torch.device("cpu"))
    assert [r.run_key for r in results] == [m.run_key for m in members]
    assert [r.outcome for r in results] == ["converged", "crashed", "converged"]
    assert "simulated failure while drawing weights" in results[1].error
    assert results[1].epochs == ()


def test_mse_rejects_labels_that_do_not_match_outputs() -> None:
    logits = torch.zeros(2, 4, 10)
    with pytest.raises(ValueError, match=r"labels of shape \(4, 1\) do not match logits"):
        member_losses(logits, torch.zeros(4, 1, dtype=torch.long), "mse")
    with pytest.raises(ValueError, match=r"expected labels of shape \(4,\)"):
        member_losses(logits, torch.zeros(3, dtype=torch.long), "cross_entropy")


def test_mse_matches_torch_mse_on_one_hot_targets() -> None:
    logits = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 9, 1, 1])
    losses = member_losses(logits, labels, "mse")
    target = torch.nn.functional.one_hot(labels, 10).float()
    expected = torch.stack([torch.nn.functional.mse_loss(logits[v], target) for v in range(3)])
    torch.testing.assert_close(losses, expected)


def test_cross_entropy_matches_torch() -> None:
    logits = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 9, 1, 1])
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[v], labels)
                            for v in range(3)])
    torch.testing.assert_close(member_losses(logits, labels, "cross_entropy"), expected)


def test_stacked_model_matches_torch_modules() -> None:
    """The stacked forward pass equals nn.Conv1d -> act -> max_pool1d -> nn.Linear layers."""
    settings = replace(BASE, conv=True, pool=True, activation="tanh", width=16)
    block = model_module.Block([settings, replace(settings, init="xavier")], [0], "cpu")
    images = band_dataset(train_size=10, test_size=10).test_images
    logits = block.forward(block.inputs(images)[None]).logits
    for v in range(2):
        params = block.member_weights(v)
        conv = torch.nn.Conv1d(1, 1, 3)
        first = torch.nn.Linear(391, 16)
        second = torch.nn.Linear(16, 10)
        with torch.no_grad():
            conv.weight.copy_(params["conv_weight"].view(1, 1, 3))
            conv.bias.copy_(params["conv_bias"])
            first.weight.copy_(params["weight1"].t())
            first.bias.copy_(params["bias1"])
            second.weight.copy_(params["weight2"].t())
            second.bias.copy_(params["bias2"])
            x = images.float()[:, None, :] / 255.0
            hidden = torch.nn.functional.max_pool1d(torch.tanh(conv(x)), 2).squeeze(1)
            expected = second(torch.tanh(first(hidden)))
        torch.testing.assert_close(logits[v].detach(), expected, rtol=1e-5, atol=1e-5)


def test_default_init_matches_pytorch_bounds() -> None:
    settings = Settings(width=100)
    params = model_module.init_member(settings, seed=0)
    bound = 1 / math.sqrt(784)
    assert params["weight1"].shape == (784, 100)
    assert params["weight1"].abs().max() <= bound
    assert params["weight1"].abs().max() > 0.9 * bound
    assert params["bias1"].abs().max() <= bound
    large = model_module.init_member(replace(settings, init="large_normal"), seed=0)
    assert large["weight1"].std() == pytest.approx(1.0, rel=0.02)
    assert torch.equal(large["bias1"], torch.zeros(100))


def test_uniform_init_equals_default_init() -> None:
    default = model_module.init_member(Settings(), seed=2)
    uniform = model_module.init_member(Settings(init="uniform"), seed=2)
    for name in default:
        assert torch.equal(default[name], uniform[name])


def test_plan_stacks_groups_by_structure_and_fills_workers() -> None:
    relu = replace(BASE, activation="relu")
    members = members_for([BASE, relu, replace(BASE, dropout=0.5)], seeds=[0, 1, 2])
    stacks = plan_stacks(members, max_stack=100, workers=1)
    assert sorted(len(s) for s in stacks) == [3, 6]
    for stack in stacks:
        assert len({m.settings.activation for m in stack}) == 1
    assert len(plan_stacks(members, max_stack=2, workers=1)) == 5
    assert len(plan_stacks(members, max_stack=100, workers=4)) == 4


def reference_logits(settings: Settings, params: dict[str, torch.Tensor], images: torch.Tensor,
                     keep: torch.Tensor | None) -> torch.Tensor:
    """One run's model written with torch.nn.functional, for autograd to differentiate."""
    act = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
           "gelu": torch.nn.functional.gelu}[settings.activation]
    x = images.float()[:, None, :] / 255.0
    if settings.conv:
        x = act(torch.nn.functional.conv1d(x, params["conv_weight"].view(1, 1, 3),
                                           params["conv_bias"]))
    if settings.pool:
        x = torch.nn.functional.max_pool1d(x, 2)
    hidden = act(x.squeeze(1) @ params["weight1"] + params["bias1"])
    if keep is not None:
        hidden = hidden * keep
    return hidden @ params["weight2"] + params["bias2"]


def reference_loss(settings: Settings, params: dict[str, torch.Tensor], images: torch.Tensor,
                   labels: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    logits = reference_logits(settings, params, images, keep)
    if settings.loss == "mse":
        return torch.nn.functional.mse_loss(logits, torch.nn.functional.one_hot(labels, 10).float())
    return torch.nn.functional.cross_entropy(logits, labels)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "gelu"])
@pytest.mark.parametrize("front", ["mlp", "pool", "conv", "conv-pool"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_written_out_gradients_equal_autograd(activation: str, front: str, loss: str) -> None:
    """The engine's explicit backward pass gives autograd's gradients for every run."""
    settings = replace(BASE, activation=activation, loss=loss, width=12,
                       conv="conv" in front, pool="pool" in front)
    variants = [settings, replace(settings, init="kaiming", dropout=0.5),
                replace(settings, init="xavier", dropout=0.2)]
    # The block orders its inputs and skips each batch's known zeros.
    data = ragged_dataset()
    order = data.arranged_inputs(settings.conv, settings.pool).order
    block = model_module.Block(variants * 2, [0, 1], "cpu", order)
    images = torch.stack([data.train_images[:16], data.train_images.flip(0)[:16]])  # (S, B, 784)
    labels = torch.stack([data.train_labels[:16], data.train_labels.flip(0)[:16]])
    uniform = torch.rand(2, 16, 12, generator=torch.Generator().manual_seed(0))
    inputs = block.inputs(images)
    nonzero = windows.window_maxima(inputs, block.layout) if settings.conv else inputs
    extents, by_extent = features.nonzero_extent(nonzero.flatten(0, 1)).view(2, 16).sort()
    images = images.gather(1, by_extent[..., None].expand(images.shape))
    labels = labels.gather(1, by_extent)
    inputs = block.inputs(images)
    bands = [features.zero_skipping_bands(e) for e in extents.tolist()]
    assert [len(b) for b in bands] == [4, 4]
    assert max(b[-1].stop for b in bands) < settings.input_features()
    trace = block.forward(inputs, uniform, bands=bands)
    member_labels = labels[:, None].expand(2, 3, 16).flatten(0, 1)
    losses, logit_grad = member_losses(trace.logits, member_labels, loss, with_grad=True)
    grads = gradients(block, trace, logit_grad)
    grads.materialize(block)
    for m in range(block.members):
        params = {name: tensor.clone().requires_grad_(True)
                  for name, tensor in block.member_weights(m).items()}
        keep = None if trace.keep is None else trace.keep[m]
        expected_loss = reference_loss(variants[m % 3], params, images[m // 3],
                                       member_labels[m], keep)
        expected_loss.backward()
        assert losses[m].item() == pytest.approx(expected_loss.item(), rel=1e-5)
        ours = block.member_weights(m, grads.params)
        for name, param in params.items():
            torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda text: f"{name} of member {m}: {text}")


@pytest.mark.parametrize("optimizer", [
    pytest.param({"lr": 0.5}, id="sgd"),
    pytest.param({"lr": 0.1, "momentum": 0.9}, id="momentum"),
    pytest.param({"lr": 0.5, "weight_decay": 0.01}, id="weight-decay"),
    pytest.param({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, id="momentum-decay"),
    pytest.param({"lr": 0.01, "optimizer": "adam"}, id="adam"),
])
@pytest.mark.parametrize("front", ["mlp", "mlp-ragged", "conv-ragged", "conv-pool",
                                   "conv-pool-ragged"])
def test_training_matches_torch_optim(optimizer: dict, front: str) -> None:
    """A run trained by the engine equals the same run trained with torch.optim and autograd.

    On ragged images the engine leaves out many of the first layer's zero terms, and
    with the front many of the front's constant windows.
    """
    settings = replace(BASE, epochs=1, conv=front.startswith("conv"), pool="pool" in front,
                       **optimizer)
    if front.endswith("ragged"):
        settings = replace(settings, batch_size=8)
        data = ragged_dataset(train_size=256, test_size=200)
    else:
        data = band_dataset(train_size=256, test_size=200)
    result, = train_stack([Member("k", 4, settings)], data, Criteria(), PROVENANCE)

    params = {name: tensor.clone().requires_grad_(True)
              for name, tensor in model_module.init_member(settings, 4).items()}
    if settings.optimizer == "adam":
        torch_optimizer = torch.optim.Adam(params.values(), lr=settings.lr)
    else:
        torch_optimizer = torch.optim.SGD(params.values(), lr=settings.lr,
                                          momentum=settings.momentum,
                                          weight_decay=settings.weight_decay)
    order = torch.randperm(256, generator=generator(4, "data"))
    losses = []
    for start in range(0, 256, settings.batch_size):
        index = order[start:start + settings.batch_size]
        loss = reference_loss(settings, params, data.train_images[index],
                              data.train_labels[index], None)
        torch_optimizer.zero_grad()
        loss.backward()
        torch_optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = reference_logits(settings, params, data.test_images, None)
    accuracy = (logits.argmax(dim=1) == data.test_labels).float().mean().item()
    assert result.epochs[1].train_loss == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert result.epochs[1].test_accuracy == pytest.approx(accuracy, abs=1 / 200)


@pytest.mark.parametrize("skip_zeros", [False, True], ids=["dense", "zeros-skipped"])
def test_factored_grad_norm_is_exact(skip_zeros: bool) -> None:
    """The engine measures a shared first layer's gradient norm without forming the gradient."""
    settings = replace(BASE, activation="relu", width=8, batch_size=8)
    variants = [settings, replace(settings, init="kaiming")] * 2
    bands = None
    if skip_zeros:
        data = ragged_dataset()
        arranged = data.arranged_inputs(False, False)
        block = model_module.Block(variants, [0, 1], "cpu", arranged.order)
        extents, by_extent = arranged.extent[:16].view(2, 8).sort()
        index = torch.arange(16).view(2, 8).gather(1, by_extent)
        images = arranged.train[index]
        bands = [features.zero_skipping_bands(e) for e in extents.tolist()]
        assert max(band[-1].stop for band in bands) < 784
    else:
        data = band_dataset(train_size=16, test_size=10)
        block = model_module.Block(variants, [0, 1], "cpu")
        index = torch.arange(16).view(2, 8)
        images = data.train_images[index]
    labels = data.train_labels[index][:, None].expand(2, 2, 8).flatten(0, 1)
    trace = block.forward(images, bands=bands)
    _, logit_grad = member_losses(trace.logits, labels, "cross_entropy", with_grad=True)
    grads = gradients(block, trace, logit_grad)
    from_factors = _grad_norms(block, grads)
    grads.materialize(block)
    assert grads.factors is None
    written_out = _grad_norms(block, grads)
    torch.testing.assert_close(from_factors, written_out, rtol=1e-5, atol=1e-6)
    assert bool((written_out > 0).all())


def test_dropout_mask_and_scale() -> None:
    """A unit is kept where its draw reaches the run's probability, scaled by 1 / (1 - p)."""
    settings = replace(BASE, width=4)
    block = model_module.Block([settings, replace(settings, dropout=0.25),
                                replace(settings, dropout=0.5)], [0], "cpu")
    uniform = torch.tensor([[[0.1, 0.3, 0.5, 0.9]]])  # (S=1, B=1, H=4)
    images = torch.zeros(1, 1, 784, dtype=torch.uint8)
    keep = block.forward(images, uniform).keep
    expected = torch.tensor([[[1.0, 1.0, 1.0, 1.0]],
                             [[0.0, 4 / 3, 4 / 3, 4 / 3]],
                             [[0.0, 0.0, 2.0, 2.0]]])
    torch.testing.assert_close(keep, expected)


def test_feature_order_by_nonzero_count() -> None:
    """Most often nonzero first; ties keep pixel order."""
    images = torch.zeros(4, 784, dtype=torch.uint8)
    images[:, 500] = 9  # nonzero in all four images
    images[:3, 7] = 1  # in three
    images[:2, 300] = 255  # in two
    images[0, 2] = images[0, 1] = 4  # in one each: a tie
    order = features.feature_order(images, pool=False)
    assert order[:5].tolist() == [500, 7, 300, 1, 2]
    assert sorted(order.tolist()) == list(range(784))  # a permutation
    arranged = features.arrange_features(images, False, order)
    assert arranged[:, :5].tolist() == [[9, 1, 255, 4, 4], [9, 1, 255, 0, 0],
                                        [9, 1, 0, 0, 0], [9, 0, 0, 0, 0]]
    assert features.nonzero_extent(arranged).tolist() == [5, 3, 2, 1]
    assert features.nonzero_extent(torch.zeros(1, 784, dtype=torch.uint8)).tolist() == [0]


def test_pooled_features_equal_max_pooling_the_scaled_pixels() -> None:
    images = torch.randint(0, 256, (5, 784), generator=torch.Generator().manual_seed(3))
    images = images.to(torch.uint8)
    pooled = features.arrange_features(images, True, None)
    scaled = torch.mul(images, 1.0 / 255.0)  # as the engine scales
    expected = torch.nn.functional.max_pool1d(scaled[:, None], 2).squeeze(1)
    assert pooled.shape == (5, 392)
    assert torch.equal(pooled * (1.0 / 255.0), expected)
    order = features.feature_order(images, pool=True)
    assert torch.equal(features.arrange_features(images, True, order), pooled[:, order])


@pytest.mark.parametrize(("extents", "expected"), [
    ([1, 2, 3, 4, 5, 6, 7, 8], [(0, 0, 4), (4, 4, 6), (6, 6, 7), (7, 7, 8)]),
    ([5, 5, 5, 5, 5, 5, 5, 5], [(0, 0, 5)]),
    ([0, 0, 0, 0, 0, 0, 0, 0], [(0, 0, 0)]),
    ([0, 0, 0, 0, 0, 0, 0, 9], [(0, 0, 0), (7, 0, 9)]),
    ([3, 3, 3, 3, 3, 3, 9, 9], [(0, 0, 3), (6, 3, 9)]),
    ([4], [(0, 0, 4)]),
])
def test_bands_cover_nonzero_terms(extents: list[int], expected: list[tuple]) -> None:
    bands = features.zero_skipping_bands(extents)
    assert [tuple(band) for band in bands] == expected
    for example, extent in enumerate(extents):  # every nonzero column is in exactly one band
        covered = [c for first, start, stop in bands if example >= first
                   for c in range(start, stop)]
        assert covered[:extent] == list(range(extent))


def test_evaluation_breaks_ties_at_first_class() -> None:
    """Equal logits predict class 0, as argmax does: the engine zeroes a frozen run."""
    data = ragged_dataset(test_size=50)
    arranged = data.arranged_inputs(False, False)
    block = model_module.Block([replace(BASE, width=8)], [0], "cpu", arranged.order)
    for tensor in block.params.values():
        tensor.zero_()
    results = evaluation.evaluate(block, arranged.test, arranged.test_labels, "sigmoid")
    assert results["counts"].tolist() == [[50, 0, 0, 0, 0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("front", ["mlp", "pool", "conv", "conv-pool"])
def test_evaluation_does_not_depend_on_chunks(front: str, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """Smaller chunks, as a bigger stack gets, change no logit; skipping zeros neither."""
    settings = replace(BASE, activation="relu", width=16, conv=front.startswith("conv"),
                       pool="pool" in front)
    data = ragged_dataset(test_size=300)
    arranged = data.arranged_inputs(settings.conv, settings.pool)
    block = model_module.Block([settings, replace(settings, init="kaiming")] * 2, [0, 1], "cpu",
                               arranged.order)
    images, labels, extents = arranged.test, arranged.test_labels, arranged.test_extent
    monkeypatch.setattr(evaluation, "SLAB", 128)  # three slabs: 128, 128 and 44 examples

    def logits(chunk_examples: int, extents: torch.Tensor | None) -> torch.Tensor:
        per_example = block.members * (block.layout.count if settings.conv else 16)
        monkeypatch.setattr(evaluation, "EVAL_ELEMENTS", chunk_examples * per_example)
        pieces = []
        for x, _, bands in evaluation._chunks(block, images, labels, extents,
                                              evaluation._chunk_size(block)):
            assert x.shape[0] <= chunk_examples
            pieces.append(block.forward(x.expand(2, *x.shape), bands=bands,
                                        for_backward=False).logits)
        return torch.cat(pieces, dim=1)

    whole = logits(1000, extents)
    for chunk_examples in (64, 100, 200):  # 100 and 200 round down to 64 and 192
        assert torch.equal(logits(chunk_examples, extents), whole), chunk_examples  # bit for bit
    torch.testing.assert_close(logits(1000, None), whole, rtol=1e-5, atol=1e-5)
    results = evaluation.evaluate(block, images, labels, "relu", confusion=True, extents=extents)
    assert int(results["confusion"].sum()) == block.members * 300
    assert results["accuracy"].tolist() == [
        (whole[m].argmax(dim=1) == labels).double().mean().item() for m in range(4)]


@pytest.mark.parametrize("front", ["mlp", "conv", "conv-pool"])
def test_dense_first_layer_matches_the_zero_skipping_one(front: str,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A GPU multiplies every term in torch's operations; forced on the CPU, that path
    trains the same runs.

    The runs have no dropout: the GPU path does not sort a batch, so its dropout masks
    would fall on other examples.
    """
    settings = replace(BASE, batch_size=8, epochs=1, momentum=0.5,
                       conv=front.startswith("conv"), pool="pool" in front)
    members = members_for([settings, replace(settings, init="kaiming")], seeds=[0, 1])
    data = ragged_dataset()
    skipping = train_stack(members, data, Criteria(), PROVENANCE)
    real_init, real_forward = model_module.Block.__init__, model_module.Block.forward
    bands_seen = []

    def dense_init(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        self.skips_zeros = False

    def forward(self, *args, **kwargs):
        bands_seen.append(kwargs.get("bands"))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(model_module.Block, "__init__", dense_init)
    monkeypatch.setattr(model_module.Block, "forward", forward)
    monkeypatch.setattr(native, "available", lambda: False)  # a GPU runs torch's front
    dense = train_stack(members, data, Criteria(), PROVENANCE)
    assert len(bands_seen) > 32 and all(bands is None for bands in bands_seen)
    for a, b in zip(skipping, dense):
        assert a.final_train_loss == pytest.approx(b.final_train_loss, rel=1e-4)
        assert a.final_accuracy == pytest.approx(b.final_accuracy, abs=0.02)
