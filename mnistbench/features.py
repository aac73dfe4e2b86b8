"""The first Linear's inputs without the convolution front, arranged to skip known zeros.

    order = feature_order(train_images, pool=False)     # most often nonzero first
    inputs = arrange_features(images, False, order)     # uint8 (N, 784), in that order
    extents = nonzero_extent(inputs)                    # where each example's zeros start
    bands = zero_skipping_bands(sorted(batch_extents))  # the pieces worth multiplying

In this order, the median MNIST digit is zero from its 415th feature on, and a batch
of 128 on average from its 634th. With a batch sorted by extent, the first layer's
product and weight update run in a few :class:`Band` pieces that leave most known
zeros out: 41% of the terms of MNIST's training batches. The skipped terms are exact
zeros, and the bands depend only on the batch itself.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

IMAGE_PIXELS = 784


def feature_order(train_images: torch.Tensor, pool: bool) -> torch.Tensor:
    """Order the first Linear's input features from most to least often nonzero.

    Args:
        train_images: uint8 ``(N, 784)``, the training set.
        pool: whether the features are max-pooled pixel pairs (392) instead of pixels.

    Returns:
        int64 ``(n,)``, a permutation of the features; ties keep pixel order.
    """
    return order_by_nonzero(train_images, lambda chunk: arrange_features(chunk, pool, None))


def order_by_nonzero(train_images: torch.Tensor,
                     features_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Order the features that ``features_of`` makes of uint8 images ``(N, 784)``, from
    most to least often nonzero. Ties keep their order."""
    nonzero = None
    for start in range(0, train_images.shape[0], 10_000):  # bounds the temporaries
        counts = (features_of(train_images[start:start + 10_000]) != 0).sum(dim=0)
        nonzero = counts if nonzero is None else nonzero + counts
    return torch.argsort(nonzero, descending=True, stable=True)


def arrange_features(images: torch.Tensor, pool: bool, order: torch.Tensor | None
                     ) -> torch.Tensor:
    """Turn uint8 images ``(..., 784)`` into the first Linear's uint8 inputs ``(..., n)``.

    Pooling takes the larger pixel of each neighbouring pair. This is exact in uint8,
    because scaling by 1/255 afterwards is monotone and commutes with max. ``order``
    (from :func:`feature_order`) then permutes the features; None keeps pixel order.
    """
    if pool:
        images = torch.maximum(images[..., 0::2], images[..., 1::2])
    if order is not None:
        images = torch.index_select(images, -1, order)
    return images.contiguous()


class Band(NamedTuple):
    """Columns ``start:stop`` of a batch's first-layer inputs, which can be nonzero only
    for the examples from ``first`` on."""

    first: int
    start: int
    stop: int


# Cut points of a batch sorted by extent, as fractions of its examples. On MNIST
# batches of 128 these multiply 59% of the first layer's terms, against 81% for one
# band. The cuts (0.75, 0.875) multiplied 63% and trained about 4% slower. A fourth
# cut saved a few more terms, but its smaller matmuls gained little or nothing.
BAND_CUTS = (0.5, 0.75, 0.875)


def zero_skipping_bands(extents: Sequence[int], cuts: Sequence[float] = BAND_CUTS, *,
                        align: int = 1) -> tuple[Band, ...]:
    """Cut a batch's first-layer inputs into bands that leave out its known zeros.

    Args:
        extents: each example's :func:`nonzero_extent`, in ascending order.
        cuts: where to cut, as fractions of the examples.
        align: each band's first example is rounded down to a multiple of this.

    Returns:
        Bands with consecutive column ranges from 0 to the largest extent; the first
        covers every example.
    """
    count = len(extents)
    stops = sorted({extents[max(1, math.ceil(cut * count)) - 1] for cut in cuts}
                   | {extents[-1]})
    bands = [Band(0, 0, stops[0])]
    for stop in stops[1:]:
        start = bands[-1].stop
        first = bisect.bisect_right(extents, start) // align * align
        bands.append(Band(first, start, stop))
    return tuple(bands)


def nonzero_extent(inputs: torch.Tensor) -> torch.Tensor:
    """Return, for uint8 inputs ``(N, n)``, the position after each row's last nonzero
    feature: int64 ``(N,)``, and 0 for an all-zero row.

    The largest value over a batch is the number of the first Linear's rows that the
    batch needs.
    """
    # int16 stores every position up to 784 in a quarter of int64's temporaries.
    positions = torch.arange(1, inputs.shape[1] + 1, dtype=torch.int16, device=inputs.device)
    extent = torch.empty(inputs.shape[0], dtype=torch.long, device=inputs.device)
    for start in range(0, inputs.shape[0], 10_000):  # bounds the temporaries
        chunk = inputs[start:start + 10_000]
        extent[start:start + 10_000] = ((chunk != 0) * positions).amax(dim=1)
    return extent
