"""The engine: trains a stack of runs that share a model structure as one batched model.

    data = DeviceData.from_dataset(load_dataset("mnist"), device="cpu")
    results = train_stack([Member(key, seed, settings), ...], data, Criteria(), provenance)

Data stays on the training device as uint8 and batches are built by indexing; there
is no DataLoader and no per-sample Python. Runs are arranged in a
:class:`~mnistbench.model.Block` of seeds x runs per seed, because runs of one seed see
the same batches. Each run's loss is its own batch mean and the stack minimizes their
sum, so every run receives exactly its own gradient. The optimizers are written out
per member so that learning rate, momentum and weight decay may differ per run.

A run whose loss or weights turn non-finite is frozen: its weights are zeroed and its
learning rate set to 0, so it cannot disturb anything. It is reported as diverged,
and its batch-mates go on.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mnistbench.backprop import Gradients, gradients, member_losses
from mnistbench.data import Dataset
from mnistbench.errors import DataError
from mnistbench.evaluation import evaluate
from mnistbench.features import (arrange_features, feature_order, nonzero_extent,
                                 zero_skipping_bands)
from mnistbench.matrix import Criteria, Settings
from mnistbench.model import Block, structure_of
from mnistbench.optimizers import Optimizer
from mnistbench.outcome import EpochRecord, RunResult, outcome_of_counts
from mnistbench.seeds import generator
from mnistbench.windows import WindowLayout, arrange_windows, window_maxima, window_order

logger = logging.getLogger(__name__)

# Train subsets are drawn once from this fixed stream, so every run with the same
# subset size trains on the same examples.
SUBSET_SEED = 1234
# The gradient norm is measured on every this many steps, starting with an epoch's
# first step. Measuring it on every step costs about 7% of an MLP's training time.
GRAD_NORM_EVERY = 10


@dataclass(frozen=True)
class Member:
    """One run to train: its key, seed index and settings."""

    run_key: str
    seed: int
    settings: Settings


@dataclass(frozen=True)
class ArrangedInputs:
    """A dataset arranged for one kind of model: with or without the convolution front,
    with or without pooling.

    ``order`` is the order of the features or of the front's windows, and ``train`` and
    ``test`` are uint8 ``(N, n)`` or ``(N, pixels * windows)`` in that order, as
    :meth:`~mnistbench.model.Block.inputs` arranges them. ``extent[i]`` is the position
    after training example ``i``'s last nonzero feature or window (see
    :func:`~mnistbench.features.nonzero_extent`). The test examples are sorted by
    their extents, ``test_extent``, and ``test_labels`` follow them.
    """

    order: torch.Tensor
    train: torch.Tensor
    extent: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    test_extent: torch.Tensor


@dataclass(frozen=True)
class DeviceData:
    """The dataset on the training device: uint8 images ``(N, 784)``, int64 labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    md5: str
    _arranged: dict[tuple[bool, bool], ArrangedInputs] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dataset(cls, dataset: Dataset, device: torch.device | str) -> DeviceData:
        """Move a dataset to ``device``, flattening its images.

        Raises:
            DataError: the images are not 28x28, or a split has no examples.
        """
        def flat(images: torch.Tensor) -> torch.Tensor:
            return images.reshape(images.shape[0], -1).contiguous().to(device)

        if tuple(dataset.train_images.shape[1:]) != (28, 28):
            height, width = dataset.train_images.shape[1:]
            raise DataError(
                f"dataset {dataset.name} has images of {height}x{width} pixels; the model "
                f"family takes 28x28 images, as in MNIST"
            )
        for split, labels in (("training", dataset.train_labels), ("test", dataset.test_labels)):
            if len(labels) == 0:
                raise DataError(f"dataset {dataset.name} has no {split} examples; expected at "
                                f"least one")
        return cls(flat(dataset.train_images), dataset.train_labels.to(device),
                   flat(dataset.test_images), dataset.test_labels.to(device), dataset.md5)

    def arranged_inputs(self, conv: bool, pool: bool) -> ArrangedInputs:
        """Return the images arranged for a model with the convolution front
        (:func:`~mnistbench.windows.arrange_windows`) or without it
        (:func:`~mnistbench.features.arrange_features`), made once per kind."""
        key = (conv, pool)
        if key not in self._arranged:
            if conv:
                layout = WindowLayout.of(pool)
                order = window_order(self.train_images, layout)
                train, test = (_arrange_in_chunks(images, arrange_windows, layout, order)
                               for images in (self.train_images, self.test_images))
                extent, test_extent = (nonzero_extent(window_maxima(train, layout)),
                                       nonzero_extent(window_maxima(test, layout)))
            else:
                order = feature_order(self.train_images, pool)
                train, test = (_arrange_in_chunks(images, arrange_features, pool, order)
                               for images in (self.train_images, self.test_images))
                extent, test_extent = nonzero_extent(train), nonzero_extent(test)
            test_extent, by_extent = test_extent.sort(stable=True)
            self._arranged[key] = ArrangedInputs(order, train, extent, test[by_extent],
                                                 self.test_labels[by_extent], test_extent)
        return self._arranged[key]

    def subset_indexes(self, size: int | None) -> torch.Tensor | None:
        """Return the fixed training subset of ``size`` examples, or None for all."""
        total = self.train_labels.shape[0]
        if size is None or size >= total:
            return None
        order = torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))
        return order[:size].sort().values.to(self.train_labels.device)


def _arrange_in_chunks(images: torch.Tensor, arrange, *args) -> torch.Tensor:
    """Apply ``arrange(chunk, *args)`` to 10,000 images at a time, into one tensor.

    Arranging 60,000 images at once held two full-size temporaries, 0.4 GB for the
    unpooled front's windows.
    """
    first = arrange(images[:10_000], *args)
    out = torch.empty(images.shape[0], *first.shape[1:], dtype=first.dtype,
                      device=first.device)
    out[:10_000] = first
    for start in range(10_000, images.shape[0], 10_000):
        out[start:start + 10_000] = arrange(images[start:start + 10_000], *args)
    return out


def _grad_norms(block: Block, gradients: Gradients) -> torch.Tensor:
    """Global gradient norm of each member: ``(M,)``.

    A first-layer gradient still in factors ``a @ b`` with ``a`` shared by a seed's
    runs is measured without writing it out: ``|a b|^2 = sum(b * (a^T a) b)``, which
    costs a third of the matmul that would form it.
    """
    total = torch.zeros(block.members, device=block.device)
    for name, grad in gradients.params.items():
        total += block.member_sums(name, grad.pow(2))
    if gradients.factors is not None:
        assert block.shared_weight1, "only a shared first layer keeps its gradient in factors"
        a, b = gradients.factors  # (S, n, B), (S, B, V * H)
        if gradients.bands is None:
            gram = block.matmul(a.transpose(1, 2), a)  # (S, B, B)
        else:  # only the rows up to the last band's stop can be nonzero
            gram = torch.stack([a[s, :bands[-1].stop].t() @ a[s, :bands[-1].stop]
                                for s, bands in enumerate(gradients.bands)])
        squares = block.matmul(gram, b).mul_(b)
        per_member = squares.view(block.seed_count, -1, block.variants, block.width)
        # One contiguous row per member, so the sum does not depend on the stack's size.
        total += per_member.transpose(1, 2).reshape(block.members, -1).sum(dim=1)
    return total.sqrt()


def _silence(block: Block, gradients: Gradients, members: torch.Tensor) -> None:
    """Zero the gradients of frozen members, whose last step may have been non-finite."""
    for name, grad in gradients.params.items():
        block.zero_members(name, grad, members)
    if gradients.factors is not None:
        a, b = gradients.factors
        if block.shared_weight1:
            b.view(block.seed_count, b.shape[1], block.variants, block.width).masked_fill_(
                members.view(block.seed_count, 1, block.variants, 1), 0.0)
        else:
            a.masked_fill_(members.view(-1, *[1] * (a.dim() - 1)), 0.0)
            b.masked_fill_(members.view(-1, 1, 1), 0.0)


def _weights_finite(block: Block) -> torch.Tensor:
    """Check that every weight of each member is finite; returns ``(M,)`` bool."""
    bad = torch.zeros(block.members, device=block.device)
    for name, param in block.params.items():
        bad += block.member_sums(name, (~torch.isfinite(param)).float())
    return bad == 0


def _blocks_by_seed(members: Sequence[Member]) -> list[list[int]]:
    """Arrange member positions into blocks of seeds x runs per seed, seed-major.

    Seeds with the same number of runs share a block; a full matrix gives one block.
    """
    by_seed: dict[int, list[int]] = {}
    for position, member in enumerate(members):
        by_seed.setdefault(member.seed, []).append(position)
    by_size: dict[int, list[int]] = {}
    for seed, positions in by_seed.items():
        by_size.setdefault(len(positions), []).append(seed)
    return [[p for seed in seeds for p in by_seed[seed]] for seeds in by_size.values()]


def train_stack(members: Sequence[Member], data: DeviceData, criteria: Criteria,
                provenance: dict, device: torch.device | str = "cpu") -> list[RunResult]:
    """Train runs that share a structure together and return one result per run, in order.

    Args:
        members: runs whose settings agree on every field of ``STRUCTURE_FIELDS``.
        data: the dataset on ``device``.
        criteria: the outcome thresholds.
        provenance: package version, git commit, torch version and dataset MD5, stored
            with every run.
        device: where to train; must hold ``data``.

    Raises:
        ValueError: when the runs do not share a structure.
    """
    if not members:
        return []
    structures = {structure_of(m.settings) for m in members}
    if len(structures) != 1:
        raise ValueError(f"a stack needs runs of one structure; got {len(structures)}")
    device = torch.device(device)
    if device.type != "cpu":
        return _train(members, data, criteria, provenance, device)
    # One thread: with more, the kernels split work by the tensors' sizes, and a run's
    # numbers would depend on its stack and the core count. ablate fills the cores with
    # one single-threaded worker process each.
    _keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(members, data, criteria, provenance, device)
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    A training step allocates and frees buffers of several MB. By default glibc hands
    many of them back, and the next step faults every page in again. A benchmark stack
    of the pooled convolution front took about 150,000 page faults and 8% longer. With
    buffers up to 32 MB (the largest threshold glibc accepts) served from the heap and
    the heap never trimmed, the process keeps its peak working set instead.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return  # not glibc: its allocator keeps its own policy
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def _train(members: Sequence[Member], data: DeviceData, criteria: Criteria, provenance: dict,
           device: torch.device) -> list[RunResult]:
    # Saturated softmax and sigmoid units produce subnormal gradients, and CPU matmuls
    # on subnormal floats run several times slower (measured: 31 s against 11 s for a
    # stack of ReLU runs at lr 2.0). Flushing them to zero costs no accuracy that matters.
    torch.set_flush_denormal(True)
    first = members[0].settings
    groups = _blocks_by_seed(members)
    arranged = data.arranged_inputs(first.conv, first.pool)
    blocks = [Block([members[i].settings for i in g],
                    list(dict.fromkeys(members[i].seed for i in g)), device,
                    arranged.order)
              for g in groups]
    optimizers = [Optimizer(block, first.optimizer) for block in blocks]
    data_streams = [[generator(seed, "data") for seed in block.seeds] for block in blocks]
    dropout_streams = [[generator(seed, "dropout", device) for seed in block.seeds]
                       for block in blocks]
    subset = data.subset_indexes(first.train_subset)
    train_size = data.train_labels.shape[0] if subset is None else subset.shape[0]
    history: list[list[EpochRecord]] = [[] for _ in members]
    diverged = [torch.zeros(block.members, dtype=torch.bool, device=device) for block in blocks]
    # Whether a block has a frozen member, kept in Python so that a step need not ask
    # the device.
    any_frozen = [False] * len(blocks)
    final_eval: list[dict] = []
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = first.precision == "tf32"
    started = time.perf_counter()

    for epoch in range(first.epochs + 1):
        epoch_started = time.perf_counter()
        loss_sums = [torch.zeros(b.members, dtype=torch.float64, device=device) for b in blocks]
        norm_sums = [torch.zeros(b.members, dtype=torch.float64, device=device) for b in blocks]
        steps = 0

        # Epoch 0 only evaluates the initial weights; every later epoch trains first.
        if epoch > 0:
            orders = [torch.stack([torch.randperm(train_size, generator=g) for g in streams])
                      .to(device) for streams in data_streams]  # each (S, train size)
            if subset is not None:
                orders = [subset[order] for order in orders]
            for start in range(0, train_size, first.batch_size):
                steps += 1
                measure = (steps - 1) % GRAD_NORM_EVERY == 0
                for b, (block, order, streams) in enumerate(zip(blocks, orders,
                                                                 dropout_streams)):
                    index = order[:, start:start + first.batch_size]  # (S, B)
                    bands = None
                    if block.skips_zeros:
                        # Each batch in ascending order of where its zeros start.
                        extents, by_extent = arranged.extent[index].sort(dim=1, stable=True)
                        index = index.gather(1, by_extent)
                        bands = [zero_skipping_bands(e) for e in extents.tolist()]
                    uniform = None
                    if block.uses_dropout:
                        uniform = torch.stack([
                            torch.rand(index.shape[1], block.width, device=device,
                                       generator=stream) for stream in streams])
                    images = torch.index_select(arranged.train, 0, index.flatten())
                    trace = block.forward(images.view(*index.shape, -1), uniform, bands=bands)
                    labels = data.train_labels[index][:, None, :].expand(
                        block.seed_count, block.variants, index.shape[1])
                    losses, logit_grad = member_losses(trace.logits, labels.flatten(0, 1),
                                                       first.loss, with_grad=True)
                    grads = gradients(block, trace, logit_grad)
                    del trace
                    if (first.optimizer == "adam" or block.matmul_dtype is not None
                            or (measure and not block.shared_weight1)):
                        grads.materialize(block)

                    # Freeze runs whose loss is no longer finite, then step.
                    bad = ~torch.isfinite(losses) & ~diverged[b]
                    if bool(bad.any()):
                        optimizers[b].freeze(bad)
                        diverged[b] |= bad
                        any_frozen[b] = True
                    if any_frozen[b]:
                        _silence(block, grads, diverged[b])
                    if measure:
                        norm_sums[b] += torch.where(diverged[b], 0.0,
                                                    _grad_norms(block, grads).double())
                    optimizers[b].step(grads)
                    loss_sums[b] += torch.where(diverged[b], 0.0, losses.double())

        # Evaluate on the test set and record each run that was alive at the epoch's start.
        last = epoch == first.epochs
        seconds = time.perf_counter() - epoch_started
        for b, (block, group) in enumerate(zip(blocks, groups)):
            finite = _weights_finite(block)
            if not bool(finite.all()):
                newly = ~finite & ~diverged[b]
                optimizers[b].freeze(newly)
                diverged[b] |= newly
                any_frozen[b] = True
            result = evaluate(block, arranged.test, arranged.test_labels, first.activation,
                              confusion=last, extents=arranged.test_extent)
            if last:
                final_eval.append(result)
            _record_epoch(history, group, block, epoch, steps, loss_sums[b], norm_sums[b],
                          diverged[b], result, seconds, first.activation)

    elapsed = time.perf_counter() - started
    return _results(members, groups, history, final_eval, criteria, provenance, device,
                    elapsed / len(members))


def _record_epoch(history: list[list[EpochRecord]], group: list[int], block: Block,
                  epoch: int, steps: int, loss_sums: torch.Tensor, norm_sums: torch.Tensor,
                  diverged: torch.Tensor, result: dict, seconds: float, activation: str) -> None:
    accuracy = result["accuracy"].tolist()
    counts = result["counts"].tolist()
    unit_fraction = result["unit_fraction"].tolist()
    losses = (loss_sums / max(steps, 1)).tolist()
    measured_steps = (steps + GRAD_NORM_EVERY - 1) // GRAD_NORM_EVERY
    norms = (norm_sums / max(measured_steps, 1)).tolist()
    dead = activation in ("relu", "gelu")
    for v, position in enumerate(group):
        records = history[position]
        if records and records[-1].nonfinite:
            continue  # diverged in an earlier epoch: nothing more to record
        nonfinite = bool(diverged[v])
        if epoch == 0:
            train_loss = None
        elif nonfinite:
            train_loss = math.nan
        else:
            train_loss = losses[v]
        records.append(EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            test_accuracy=math.nan if nonfinite else accuracy[v],
            prediction_counts=tuple(counts[v]),
            dead_fraction=unit_fraction[v] if dead and not nonfinite else None,
            saturated_fraction=unit_fraction[v] if not dead and not nonfinite else None,
            grad_norm=None if epoch == 0 or nonfinite else norms[v],
            nonfinite=nonfinite,
            seconds=seconds,
        ))


def _results(members: Sequence[Member], groups: list[list[int]],
             history: list[list[EpochRecord]], final_eval: list[dict], criteria: Criteria,
             provenance: dict, device: torch.device, seconds_per_run: float) -> list[RunResult]:
    results: list[RunResult | None] = [None] * len(members)
    for group, evaluation in zip(groups, final_eval):
        confusion = evaluation["confusion"].tolist()
        for v, position in enumerate(group):
            member, records = members[position], history[position]
            final = records[-1]
            accuracy = None if final.nonfinite else final.test_accuracy
            outcome, collapse_class, share = outcome_of_counts(
                final.prediction_counts, accuracy, final.nonfinite, criteria)
            results[position] = RunResult(
                run_key=member.run_key, seed=member.seed, settings=member.settings.to_dict(),
                outcome=outcome, collapse_class=collapse_class, final_accuracy=accuracy,
                final_train_loss=final.train_loss, max_class_share=share,
                epochs=tuple(records),
                confusion=None if final.nonfinite else tuple(map(tuple, confusion[v])),
                train_seconds=seconds_per_run, device=str(device), provenance=provenance,
            )
    return [r for r in results if r is not None]
