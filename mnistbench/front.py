"""The convolution front: ``Conv1d(1, 1, 3)`` and its activation, with or without pooling.

Without pooling, a window's three pixels give one output. With pooling, a window of
four pixels gives both outputs of a pooling pair. On the CPU the compiled kernels of
:mod:`mnistbench.native` compute the outputs straight from the uint8 windows, pooled
in the same pass. Elsewhere (a GPU, or a CPU without a C compiler) the convolution is
a matmul with a small inner dimension: each run's taps and bias against its seed's
window pixels and a row of ones (:mod:`mnistbench.windows`). Either way the front
computes only the windows inside a batch's bands.

    front = run_front(block, images, bands, for_backward=True)
    front.output      # the first Linear's input, packed: (M, L)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from mnistbench import native
from mnistbench.features import Band
from mnistbench.initialization import CONV_TAPS
from mnistbench.windows import Packing, packed_rows, packed_width, seed_members

if TYPE_CHECKING:
    from mnistbench.activations import Activation
    from mnistbench.model import Block


class FrontPass(NamedTuple):
    """Tensors of the front's forward pass, as :class:`~mnistbench.model.Trace` keeps them.

    ``rows`` is the packed float inputs of the matmul, or with the compiled kernels the
    batch's uint8 windows, which they read again in the backward pass.
    """

    rows: torch.Tensor
    front_in: torch.Tensor | None
    front_out: torch.Tensor
    pool_gap: torch.Tensor | None
    output: torch.Tensor
    packings: list[Packing]


def run_front(block: Block, images: torch.Tensor, bands: list[tuple[Band, ...]] | None,
              for_backward: bool) -> FrontPass:
    """Run the front of every run on its seed's batch of windows (see
    :meth:`~mnistbench.model.Block.forward` for the arguments)."""
    seeds, batch = images.shape[:2]
    act, count = block.activation, block.layout.count
    if bands is None:
        packings = [Packing.whole(batch, count)] * seeds
    else:
        packings = [Packing.of(seed_bands, batch, count) for seed_bands in bands]
    if native.runs_on(block.device):
        return _native_front(block, images, packings, for_backward)
    if images.stride(0) == 0:  # one batch for every seed, as in evaluation
        rows = packed_rows(images[:1], block.layout, packings[:1]).expand(seeds, -1, -1)
    else:
        rows = packed_rows(images, block.layout, packings)
    front_in = _window_products(block, rows, packings)  # (M, outputs, L)
    gap = None
    if not block.pool:
        front_in = front_in.view(block.members, -1)
        front_out = output = act.forward_(front_in)
    elif act.monotone:  # pooling first activates half as many values
        even, odd = front_in[:, 0], front_in[:, 1]
        gap = odd - even if for_backward else None
        front_out = output = act.forward_(torch.maximum(even, odd))  # (M, L)
    else:
        front_in, front_out, gap, output = _activate_pairs(act, front_in, for_backward)
    return FrontPass(rows, front_in if act.needs_input else None, front_out, gap, output,
                     packings)


def _native_front(block: Block, images: torch.Tensor, packings: list[Packing],
                  for_backward: bool) -> FrontPass:
    """Run the front in the compiled kernels. They read the uint8 windows themselves, so
    the pass keeps those as its ``rows``."""
    act, name, members = block.activation, block.settings[0].activation, block.members
    width = packed_width(packings)
    inputs = (images, block.layout, packings, block.params["conv_weight"],
              block.params["conv_bias"])
    if block.pool and not act.monotone:
        front_in = torch.empty(members, 2, width)
        native.front_forward(*inputs, "pair", front_in[:, 0], front_in[:, 1])
        front_in, front_out, gap, output = _activate_pairs(act, front_in, for_backward)
        return FrontPass(images, front_in if act.needs_input else None, front_out, gap,
                         output, packings)
    # Pooled before a monotone activation. The backward kernel computes the pairs again
    # to route the gradient, so no gap is kept.
    mode = "max" if block.pool else "plain"
    front_in = torch.empty(members, width)
    if name in native.ACTIVATIONS:  # activated in the same pass
        native.front_forward(*inputs, mode, front_in, activation=name)
        front_out = front_in
    else:
        native.front_forward(*inputs, mode, front_in)
        front_out = act.forward_(front_in)
    return FrontPass(images, front_in if act.needs_input else None, front_out, None,
                     front_out, packings)


def _activate_pairs(act: Activation, front_in: torch.Tensor, for_backward: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Activate both outputs of each pooled pair ``(M, 2, L)``, then pool them, for an
    activation that does not commute with max-pooling. Returns the pre-activation, the
    activated pairs, the gap (odd minus even, for the backward pass) and the pooled
    output."""
    front_out = act.forward_(front_in)
    even, odd = front_out[:, 0], front_out[:, 1]
    gap = odd - even if for_backward else None
    return front_in, front_out, gap, torch.maximum(even, odd)


def conv_taps(block: Block) -> torch.Tensor:
    """Arrange each run's taps to multiply a window's pixels and a row of ones.

    Pooled: ``(M, 2, 5)``, with the even output's taps ``(w0, w1, w2, 0, b)`` and the
    odd one's ``(0, w0, w1, w2, b)``. Unpooled: ``(M, 1, 4)``, ``(w0, w1, w2, b)``.
    """
    weight, bias = block.params["conv_weight"], block.params["conv_bias"]
    if not block.pool:
        return torch.cat([weight, bias], dim=1)[:, None]
    taps = torch.zeros(block.members, 2, CONV_TAPS + 2, device=weight.device)
    taps[:, 0, :CONV_TAPS] = weight
    taps[:, 1, 1:CONV_TAPS + 1] = weight
    taps[:, :, CONV_TAPS + 1:] = bias[:, None]
    return taps


def front_constant(block: Block) -> torch.Tensor:
    """Return each run's front output where a window is all zeros, ``act(b)``: ``(M, 1)``."""
    return block.activation.forward_(block.params["conv_bias"].clone())


def _window_products(block: Block, rows: torch.Tensor, packings: list[Packing]
                     ) -> torch.Tensor:
    """Multiply each run's taps by its seed's packed rows: ``(M, outputs, L)``, the
    convolution outputs of each packed window, zero past a seed's own length."""
    taps, variants = conv_taps(block), block.variants
    out = torch.empty(block.members, taps.shape[1], rows.shape[2], device=rows.device)
    for s, runs, packing in seed_members(packings, variants):
        length = packing.length
        # Each run's product is its own matrix, so it does not depend on the stack.
        torch.bmm(taps[runs], rows[s, :, :length].expand(variants, -1, -1),
                  out=out[runs, :, :length])
        out[runs, :, length:] = 0.0
    return out
