"""Evaluation of every run of a block on a labelled set, in memory-bounded chunks.

    result = evaluate(block, images, labels, "relu", confusion=True)
    result["accuracy"]     # (M,), and counts, unit_fraction, confusion

Without the convolution front on the CPU, the set is evaluated in fixed slabs of
examples sorted by extent, and each slab's first layer skips its known zeros, as a
training step does.
"""

from __future__ import annotations

import torch

from mnistbench.features import Band, zero_skipping_bands
from mnistbench.initialization import NUM_CLASSES
from mnistbench.model import Block

# Evaluation processes the test set in chunks of at most this many activations per
# layer (members x examples x features), 16 MB of float32. This bounds memory for big
# stacks, and it evaluated about 10% faster than 64 MB chunks, which malloc maps afresh.
EVAL_ELEMENTS = 4_000_000
SATURATION_MARGIN = 0.01  # sigmoid/tanh outputs this close to a bound count as saturated
# Chunks start at multiples of this many examples. MKL's result for an example can
# depend on where it sits in a matmul. The 10-class layer gave other low bits for
# examples in chunks of 333 or 555 than in one product of 10,000, but not in chunks of
# 64 or 1,000. With fixed boundaries, a bigger stack (smaller chunks) changes no result.
TILE = 64
# Examples per slab, whose bands are cut at these fractions. A slab's bands depend only
# on its examples, never on the chunk size.
SLAB = 16 * TILE
SLAB_CUTS = (0.25, 0.5, 0.625, 0.75, 0.875, 0.9375)


@torch.no_grad()
def evaluate(block: Block, images: torch.Tensor, labels: torch.Tensor, activation: str,
             *, confusion: bool = False, extents: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
    """Evaluate every member of a block on a labelled set.

    Args:
        images: uint8 ``(N, 784)`` arranged by :meth:`Block.inputs`; labels: int64 ``(N,)``.
        extents: the images' :func:`~mnistbench.features.nonzero_extent`, in ascending
            order, to skip known zeros; None multiplies everything.

    Returns:
        ``accuracy`` (M,), ``counts`` (M, 10) predictions per class, ``unit_fraction``
        (M,) dead units (relu, gelu) or saturated activations (sigmoid, tanh), and with
        ``confusion=True`` also ``confusion`` (M, 10, 10), rows true class.
    """
    members, width = block.members, block.width
    chunk = _chunk_size(block)
    correct = torch.zeros(members, dtype=torch.long, device=block.device)
    counts = torch.zeros(members * NUM_CLASSES, dtype=torch.long, device=block.device)
    matrix = torch.zeros(members * NUM_CLASSES**2, dtype=torch.long, device=block.device)
    alive = torch.zeros(members, width, dtype=torch.bool, device=block.device)
    saturated = torch.zeros(members, dtype=torch.float64, device=block.device)
    offsets = torch.arange(members, device=block.device)[:, None]
    for x, y, bands in _chunks(block, images, labels, extents, chunk):
        trace = block.forward(x.expand(block.seed_count, *x.shape), bands=bands,
                              for_backward=False)
        # torch.max returns the first maximum, as argmax does. Over the logits'
        # (M, 10, C) layout it runs 5x faster than argmax.
        predicted = torch.max(trace.logits.transpose(1, 2), dim=1).indices  # (M, C)
        correct += (predicted == y[None]).sum(dim=1)
        counts += torch.bincount((offsets * NUM_CLASSES + predicted).flatten(),
                                 minlength=members * NUM_CLASSES)
        if confusion:
            cells = offsets * NUM_CLASSES**2 + y[None] * NUM_CLASSES + predicted
            matrix += torch.bincount(cells.flatten(), minlength=members * NUM_CLASSES**2)
        hidden = trace.hidden
        if activation in ("relu", "gelu"):
            alive |= (hidden > 0).any(dim=1)  # relu(x) and gelu(x) are positive where x is
        else:
            low = -1.0 if activation == "tanh" else 0.0
            near = (hidden < low + SATURATION_MARGIN) | (hidden > 1.0 - SATURATION_MARGIN)
            # Summing a bool tensor converts it to int64 first, 3x slower than this.
            saturated += torch.count_nonzero(near, dim=(1, 2)).double()
    total = labels.shape[0]
    if activation in ("relu", "gelu"):
        unit_fraction = 1.0 - alive.float().mean(dim=1)
    else:
        unit_fraction = (saturated / (total * width)).float()
    result = {
        "accuracy": correct.double() / total,
        "counts": counts.view(members, NUM_CLASSES),
        "unit_fraction": unit_fraction,
    }
    if confusion:
        result["confusion"] = matrix.view(members, NUM_CLASSES, NUM_CLASSES)
    return result


def _chunks(block: Block, images: torch.Tensor, labels: torch.Tensor,
            extents: torch.Tensor | None, chunk: int):
    """Yield ``(images, labels, bands)`` chunks of at most ``chunk`` examples."""
    total = labels.shape[0]
    skip = extents is not None and block.skips_zeros
    slab = SLAB if skip else max(total, 1)
    for slab_start in range(0, total, slab):
        slab_stop = min(total, slab_start + slab)
        bands = None
        if skip:
            bands = zero_skipping_bands(extents[slab_start:slab_stop].tolist(), SLAB_CUTS,
                                        align=TILE)
        for start in range(slab_start, slab_stop, chunk):
            stop = min(slab_stop, start + chunk)
            chunk_bands = None
            if bands is not None:
                chunk_bands = [_rows_of(bands, start - slab_start, stop - start)]
                chunk_bands *= block.seed_count
            yield images[start:stop], labels[start:stop], chunk_bands


def _rows_of(bands: tuple[Band, ...], offset: int, count: int) -> tuple[Band, ...]:
    """Return the bands of examples ``offset`` to ``offset + count - 1``, counted from
    ``offset``."""
    whole, *rest = bands
    return (whole, *(Band(max(0, first - offset), start, stop)
                     for first, start, stop in rest if first < offset + count))


def _chunk_size(block: Block) -> int:
    """Return the examples per chunk: a multiple of ``TILE`` that keeps activations near
    ``EVAL_ELEMENTS``."""
    # The convolution front's output, (M, chunk, windows), is the largest tensor when on:
    # 782 windows per example, or 391 with pooling.
    per_example = block.members * max(block.width, block.layout.count if block.conv else 0)
    return max(1, EVAL_ELEMENTS // per_example // TILE) * TILE
