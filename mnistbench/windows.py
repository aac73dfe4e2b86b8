"""The convolution front's windows, packed so that a batch skips known constants.

Convolution output ``i`` reads the three pixels ``i`` to ``i + 2``. With max-pooling,
the first Linear's input ``p`` pools outputs ``2p`` and ``2p + 1``, which read the four
pixels ``2p`` to ``2p + 3``. Those pixels form a window: 782 windows of three pixels
without pooling, 391 of four with it. Where a window's pixels are all zero, its
outputs equal the front's bias ``b``, and the first Linear's input is the constant
``act(b)``.

Windows are stored most often nonzero first, as the features without the front are
(:mod:`mnistbench.features`), and a training batch is sorted by where its examples'
nonzero windows end. The front and the first layer are then computed only inside the
batch's :class:`~mnistbench.features.Band` pieces, each packed as one block after the
other. An example's remaining windows hold the constant, so the first layer adds
``act(b)`` times the sum of its skipped weight rows instead. On MNIST's training
batches of 128 the bands hold about two thirds of the windows.

    layout = WindowLayout.of(pool=True)              # 391 windows of 4 pixels
    order = window_order(train_images, layout)       # most often nonzero first
    windows = arrange_windows(images, layout, order) # uint8 (N, 4 * 391)
    packing = Packing.of(bands, batch, layout.count) # where each band's block lies
    for band, block in packing.blocks(packed):       # (runs, batch - first, stop - start)
        ...

Without bands, one band covers every window and nothing is skipped: the packed layout
is then the plain ``(batch, windows)`` layout of each run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from mnistbench import native
from mnistbench.features import IMAGE_PIXELS, Band, order_by_nonzero

# Packed rows are a multiple of this many floats long. MKL's result can depend on how
# its operands are aligned, and an element-wise result on where its row ends (see
# mnistbench.activations.VECTOR_MULTIPLE). With rows exactly as long as the stack's
# longest packing, a run's numbers would depend on the runs stacked with it.
ROW_ALIGNMENT = 64


class WindowLayout(NamedTuple):
    """The windows that the front reads from an image: ``count`` windows of ``pixels``
    consecutive pixels, window ``j`` starting at pixel ``stride * j``."""

    pixels: int
    stride: int
    count: int

    @classmethod
    def of(cls, pool: bool) -> WindowLayout:
        """Return the windows of the front with max-pooling (391 of 4 pixels) or without
        it (782 of 3)."""
        pixels, stride = (4, 2) if pool else (3, 1)
        return cls(pixels, stride, (IMAGE_PIXELS - pixels) // stride + 1)


def arrange_windows(images: torch.Tensor, layout: WindowLayout, order: torch.Tensor | None
                    ) -> torch.Tensor:
    """Turn uint8 images ``(..., 784)`` into their windows, uint8 ``(..., pixels * count)``.

    Entry ``k * count + j`` contains pixel ``stride * order[j] + k``. None keeps window
    order.
    """
    pixels, stride, count = layout
    span = stride * (count - 1) + 1
    windows = torch.stack([images[..., k:k + span:stride] for k in range(pixels)], dim=-2)
    if order is not None:
        windows = torch.index_select(windows, -1, order)
    return windows.flatten(-2)


def window_maxima(windows: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Return each window's largest pixel, uint8 ``(..., count)``, from
    :func:`arrange_windows`' output; zero exactly where the window's output is the
    constant."""
    return windows.unflatten(-1, (layout.pixels, layout.count)).amax(dim=-2)


def window_order(train_images: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Order the windows from most to least often nonzero in uint8 ``(N, 784)`` images.

    Returns int64 ``(count,)``, a permutation. Ties keep window order.
    """
    return order_by_nonzero(
        train_images, lambda chunk: window_maxima(arrange_windows(chunk, layout, None), layout))


class Packing(NamedTuple):
    """The place of one seed's bands in a packed tensor of ``(runs, length)``.

    Band ``k``'s block covers the examples ``first`` to ``batch - 1`` and the windows
    ``start`` to ``stop - 1`` of ``windows``. It is stored row-major from ``offsets[k]``
    on, and the last offset is the packed length.
    """

    bands: tuple[Band, ...]
    offsets: tuple[int, ...]
    batch: int
    windows: int

    @classmethod
    def of(cls, bands: Sequence[Band], batch: int, windows: int) -> Packing:
        offsets = [0]
        for first, start, stop in bands:
            offsets.append(offsets[-1] + (batch - first) * (stop - start))
        return cls(tuple(bands), tuple(offsets), batch, windows)

    @classmethod
    def whole(cls, batch: int, windows: int) -> Packing:
        """Return one band over every window: the plain ``(batch, windows)`` layout."""
        return cls.of((Band(0, 0, windows),), batch, windows)

    @property
    def length(self) -> int:
        return self.offsets[-1]

    def blocks(self, packed: torch.Tensor) -> Iterator[tuple[Band, torch.Tensor]]:
        """Yield each band with its block of ``packed`` ``(runs, length or more)``, viewed as
        ``(runs, batch - first, stop - start)``."""
        runs = packed.shape[0]
        for band, low, high in zip(self.bands, self.offsets, self.offsets[1:]):
            yield band, packed[:, low:high].view(runs, self.batch - band.first,
                                                 band.stop - band.start)

    def tail_rows(self) -> list[tuple[int, int, int]]:
        """Return ``(first, last, stop)``: examples ``first`` to ``last - 1`` are packed up
        to window ``stop``, and contain the constant from there on."""
        lasts = [band.first for band in self.bands[1:]] + [self.batch]
        return [(band.first, last, band.stop) for band, last in zip(self.bands, lasts)]

    def tail_columns(self) -> list[tuple[int, int, int]]:
        """Return ``(start, stop, examples)``: windows ``start`` to ``stop - 1`` contain the
        constant for the batch's first ``examples`` examples."""
        stops = [band.stop for band in self.bands] + [self.windows]
        lasts = [band.first for band in self.bands[1:]] + [self.batch]
        return [(start, stop, last) for start, stop, last in zip(stops, stops[1:], lasts)
                if start < stop]


def packed_width(packings: Sequence[Packing]) -> int:
    """Return the row length of a packed tensor: the longest packing, rounded up to a
    multiple of ``ROW_ALIGNMENT``."""
    longest = max(packing.length for packing in packings)
    return -(-longest // ROW_ALIGNMENT) * ROW_ALIGNMENT


def packed_rows(windows: torch.Tensor, layout: WindowLayout, packings: Sequence[Packing]
                ) -> torch.Tensor:
    """Build each seed's convolution inputs from its batch's uint8 windows, scaled to [0, 1].

    Args:
        windows: uint8 ``(S, B, pixels * count)`` from :func:`arrange_windows`, each
            seed's batch in the order its packing assumes.
        packings: one per seed.

    Returns:
        ``(S, pixels + 1, L)`` for the :func:`packed_width` ``L``: a row per pixel of
        each packed window, a last row of ones for the bias, and zeros past a seed's own
        length.
    """
    seeds, batch = windows.shape[:2]
    rows = torch.empty(seeds, layout.pixels + 1, packed_width(packings),
                       device=windows.device)
    pixels = windows.view(seeds, batch, layout.pixels, layout.count).transpose(1, 2)
    whole = Packing.whole(batch, layout.count)
    if all(packing == whole for packing in packings):
        # Every seed in the plain layout, as on a GPU: a few whole-tensor operations
        # instead of a few per seed.
        plain = rows[:, :layout.pixels, :whole.length].view(seeds, layout.pixels, batch, -1)
        torch.mul(pixels, 1.0 / 255.0, out=plain)
        rows[:, layout.pixels, :whole.length] = 1.0
        rows[:, :, whole.length:] = 0.0
        return rows
    for s, packing in enumerate(packings):
        for (first, start, stop), block in packing.blocks(rows[s, :layout.pixels]):
            torch.mul(pixels[s, :, first:, start:stop], 1.0 / 255.0, out=block)
        rows[s, :layout.pixels, packing.length:] = 0.0
        rows[s, layout.pixels, :packing.length] = 1.0
        rows[s, layout.pixels, packing.length:] = 0.0
    return rows


def seed_members(packings: Sequence[Packing], variants: int
                 ) -> Iterator[tuple[int, slice, Packing]]:
    """Yield each seed's index, its runs' slice of the stack and its packing."""
    for s, packing in enumerate(packings):
        yield s, slice(s * variants, (s + 1) * variants), packing


def first_layer(packed: torch.Tensor, weight: torch.Tensor, constant: torch.Tensor,
                packings: Sequence[Packing]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiply each run's packed inputs by its first-layer weights: ``(M, B, H)``.

    Args:
        packed: ``(M, L)`` inputs.
        weight: ``(M, windows, H)`` in window order.
        constant: ``(M, 1)``, each run's ``act(b)``.

    Returns:
        The product without the bias, and the sums of each run's weight rows past each
        band's stop, ``(M, bands, H)``, zero for the bands its seed lacks, which the
        backward pass needs.
    """
    members, batch, width = weight.shape[0], packings[0].batch, weight.shape[2]
    variants = members // len(packings)
    out = torch.empty(members, batch, width, device=weight.device)
    if native.runs_on(weight.device):
        native.bands_forward(packed, weight, out, packings)
        return out, native.first_layer_tails(weight, out, constant, packings)
    for _, runs, packing in seed_members(packings, variants):
        target, w = out[runs], weight[runs]
        for k, ((first, start, stop), block) in enumerate(packing.blocks(packed[runs])):
            if k == 0:
                torch.bmm(block, w[:, start:stop], out=target)
            else:
                _add_product(target[:, first:], block, w[:, start:stop])
    tails = torch.zeros(members, max(len(p.bands) for p in packings), width,
                        device=weight.device)
    for _, runs, packing in seed_members(packings, variants):
        target, w = out[runs], weight[runs]
        rows = packing.tail_rows()
        # Each sum reads its rows afresh. Sums built up from the pieces between stops
        # would depend on which bands a packing has, and an evaluation chunk leaves
        # out the bands past its examples.
        sums = tails[runs, :len(rows)]
        for k, (first, last, stop) in enumerate(rows):
            torch.sum(w[:, stop:], dim=1, out=sums[:, k])
            target[:, first:last].addcmul_(constant[runs, :, None], sums[:, k, None])
    return out, tails


def _add_product(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0
                 ) -> None:
    """Add ``alpha * a @ b`` (batched) to ``target``, for the small bands past the first.

    ``baddbmm_`` into a view whose runs are not one contiguous batch calls one matmul per
    run, and for these small products the calls cost more than a temporary (3% of a
    pooled convolution step, measured).
    """
    target.add_(torch.bmm(a, b), alpha=alpha)


def input_gradient(grad: torch.Tensor, weight: torch.Tensor, packings: Sequence[Packing]
                   ) -> torch.Tensor:
    """Return the gradient with respect to the packed inputs, ``(M, L)``, from the
    gradient ``(M, B, H)`` with respect to the first layer's output."""
    members = weight.shape[0]
    variants = members // len(packings)
    out = torch.empty(members, packed_width(packings), device=weight.device)
    if native.runs_on(weight.device):
        native.bands_input_gradient(grad, weight, out, packings)
        return out
    for _, runs, packing in seed_members(packings, variants):
        w = weight[runs]
        for (first, start, stop), block in packing.blocks(out[runs]):
            torch.bmm(grad[runs, first:], w[:, start:stop].transpose(1, 2), out=block)
        out[runs, packing.length:] = 0.0
    return out


def add_weight_gradient(out: torch.Tensor, packed: torch.Tensor, grad: torch.Tensor,
                        constant: torch.Tensor, packings: Sequence[Packing], alpha: float
                        ) -> None:
    """Add ``alpha`` times the first layer's weight gradient to ``out`` ``(M, windows, H)``.

    The packed blocks give the rows inside the bands. The rows past an example's last
    band see the constant, so they add the constant times the sum of those examples'
    gradients.
    """
    variants = out.shape[0] // len(packings)
    if native.runs_on(out.device):
        native.bands_weight_gradient(out, packed, grad, packings, alpha)
        native.first_layer_weight_tails(out, grad, constant, packings, alpha)
        return
    for _, runs, packing in seed_members(packings, variants):
        target, g = out[runs], grad[runs]
        for k, ((first, start, stop), block) in enumerate(packing.blocks(packed[runs])):
            if k == 0:
                target[:, start:stop].baddbmm_(block.transpose(1, 2), g[:, first:], alpha=alpha)
            else:
                _add_product(target[:, start:stop], block.transpose(1, 2), g[:, first:], alpha)
    for _, runs, packing in seed_members(packings, variants):
        target, g = out[runs], grad[runs]
        for start, stop, examples in packing.tail_columns():
            summed = g[:, :examples].sum(dim=1, keepdim=True).mul_(constant[runs, :, None])
            target[:, start:stop].add_(summed, alpha=alpha)


def constant_gradient(grad: torch.Tensor, tails: torch.Tensor, packings: Sequence[Packing]
                      ) -> torch.Tensor:
    """Return the gradient with respect to each run's constant, ``(M,)``: every example's
    output gradient against the sum of the weight rows where its input is the constant
    (``tails`` from :func:`first_layer`)."""
    if native.runs_on(grad.device):
        return native.constant_gradient(grad, tails, packings)
    variants = grad.shape[0] // len(packings)
    out = torch.empty(grad.shape[0], device=grad.device)
    for _, runs, packing in seed_members(packings, variants):
        rows = packing.tail_rows()
        group_sums = torch.stack([grad[runs, first:last].sum(dim=1)
                                  for first, last, _ in rows], dim=1)
        out[runs] = (group_sums * tails[runs, :len(rows)]).sum(dim=(1, 2))
    return out
