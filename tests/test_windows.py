"""Tests of the convolution front's windows and of the packed first layer that skips them."""

from __future__ import annotations

import pytest
import torch

from mnistbench import windows
from mnistbench.activations import ACTIVATIONS, VECTOR_MULTIPLE
from mnistbench.features import Band, nonzero_extent, zero_skipping_bands

WIDTH = 6
POOLED, UNPOOLED = windows.WindowLayout.of(True), windows.WindowLayout.of(False)


def test_windows_contain_output_pixels() -> None:
    """Pooled windows contain the four pixels of each pooling pair, unpooled ones the
    three pixels of each output."""
    assert tuple(POOLED) == (4, 2, 391)
    assert tuple(UNPOOLED) == (3, 1, 782)
    images = torch.randint(0, 256, (3, 784), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.uint8)
    arranged = windows.arrange_windows(images, POOLED, None).view(3, 4, 391)
    for p in (0, 1, 200, 390):
        assert arranged[:, :, p].tolist() == images[:, 2 * p:2 * p + 4].tolist()
    order = torch.randperm(391, generator=torch.Generator().manual_seed(1))
    reordered = windows.arrange_windows(images, POOLED, order).view(3, 4, 391)
    assert torch.equal(reordered, arranged[:, :, order])
    unpooled = windows.arrange_windows(images, UNPOOLED, None).view(3, 3, 782)
    for i in (0, 1, 400, 781):
        assert unpooled[:, :, i].tolist() == images[:, i:i + 3].tolist()


def test_window_order_counts_nonzero_windows() -> None:
    images = torch.zeros(4, 784, dtype=torch.uint8)
    images[:, 101] = 5  # pixel 101 lies in windows 49 and 50, in all four images
    images[:3, 10] = 1  # windows 4 and 5, three images
    images[0, 783] = 7  # window 390 only, one image
    order = windows.window_order(images, POOLED)
    assert order[:5].tolist() == [49, 50, 4, 5, 390]
    assert sorted(order.tolist()) == list(range(391))
    maxima = windows.window_maxima(windows.arrange_windows(images, POOLED, order), POOLED)
    assert nonzero_extent(maxima).tolist() == [5, 4, 4, 2]
    # Without pooling, pixel 101 lies in windows 99 to 101, pixel 10 in 8 to 10.
    assert windows.window_order(images, UNPOOLED)[:7].tolist() == [99, 100, 101, 8, 9, 10, 781]


def test_packing_offsets_and_tails() -> None:
    bands = (Band(0, 0, 10), Band(5, 10, 30), Band(7, 30, 40))
    packing = windows.Packing.of(bands, batch=8, windows=391)
    assert packing.offsets == (0, 80, 140, 150)
    assert packing.length == 150
    assert packing.tail_rows() == [(0, 5, 10), (5, 7, 30), (7, 8, 40)]
    assert packing.tail_columns() == [(10, 30, 5), (30, 40, 7), (40, 391, 8)]
    assert windows.packed_width([packing]) == 192  # a multiple of 64
    whole = windows.Packing.whole(batch=8, windows=391)
    assert whole.length == 8 * 391
    assert whole.tail_columns() == []
    blocks = list(packing.blocks(torch.arange(300.0).view(2, 150)))
    assert [tuple(block.shape) for _, block in blocks] == [(2, 8, 10), (2, 3, 20), (2, 1, 10)]
    assert blocks[1][1][1, 0, 0] == 150 + 80


def ragged_windows(seeds: int, batch: int) -> tuple[torch.Tensor, list[tuple[Band, ...]]]:
    """Random windows that are zero past a ragged extent, sorted, with their bands."""
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randint(1, 256, (seeds, batch, 4, 391), generator=generator)
    extents = torch.randint(0, 391, (seeds, batch), generator=generator).sort(dim=1).values
    pixels.masked_fill_(torch.arange(391) >= extents[..., None, None], 0)
    bands = [zero_skipping_bands(e) for e in extents.tolist()]
    return pixels.to(torch.uint8).flatten(2), bands


def dense_inputs(packed: torch.Tensor, constant: torch.Tensor, packings, variants: int
                 ) -> torch.Tensor:
    """Unpack ``(M, L)`` into ``(M, B, 391)``, with the constant outside the bands."""
    members = packed.shape[0]
    batch = packings[0].batch
    dense = constant[:, :, None].expand(members, batch, 391).clone()
    for s, packing in enumerate(packings):
        runs = slice(s * variants, (s + 1) * variants)
        for (first, start, stop), block in packing.blocks(packed[runs]):
            dense[runs, first:, start:stop] = block
    return dense


@pytest.mark.parametrize("layout", [POOLED, UNPOOLED], ids=["pooled", "unpooled"])
def test_whole_packing_gives_plain_rows(layout: windows.WindowLayout) -> None:
    pixels, bands = ragged_windows(2, 8)
    if layout == UNPOOLED:
        pixels = torch.randint(0, 256, (2, 8, 3 * 782), dtype=torch.uint8)
    whole = [windows.Packing.whole(8, layout.count)] * 2
    rows = windows.packed_rows(pixels, layout, whole)
    length = 8 * layout.count
    expected = pixels.view(2, 8, layout.pixels, layout.count).transpose(1, 2)
    expected = expected.reshape(2, layout.pixels, length) * (1.0 / 255.0)
    assert torch.equal(rows[:, :layout.pixels, :length], expected)
    assert bool((rows[:, layout.pixels, :length] == 1).all())
    assert bool((rows[:, :, length:] == 0).all())
    # With another packing beside it, the whole one is packed seed by seed, to the same rows.
    narrow = windows.Packing.of((Band(0, 0, 10),), 8, layout.count)
    per_seed = windows.packed_rows(pixels, layout, [whole[0], narrow])
    assert torch.equal(per_seed[0], rows[0])


def test_packed_first_layer_equals_dense() -> None:
    """Inside the bands the packed inputs, outside them the constant: as one product."""
    seeds, variants, batch = 2, 3, 16
    members = seeds * variants
    pixels, bands = ragged_windows(seeds, batch)
    packings = [windows.Packing.of(b, batch, 391) for b in bands]
    rows = windows.packed_rows(pixels, POOLED, packings)
    assert rows.shape[2] % 64 == 0
    for s, packing in enumerate(packings):
        assert bool((rows[s, 4, :packing.length] == 1).all())
        assert bool((rows[s, :, packing.length:] == 0).all())
    generator = torch.Generator().manual_seed(3)
    packed = torch.randn(members, rows.shape[2], generator=generator)
    weight = torch.randn(members, 391, WIDTH, generator=generator)
    constant = torch.randn(members, 1, generator=generator)
    grad = torch.randn(members, batch, WIDTH, generator=generator)
    dense = dense_inputs(packed, constant, packings, variants)

    out, tails = windows.first_layer(packed, weight, constant, packings)
    torch.testing.assert_close(out, dense @ weight, rtol=1e-4, atol=1e-4)

    update = torch.zeros_like(weight)
    windows.add_weight_gradient(update, packed, grad, constant, packings, alpha=-2.0)
    torch.testing.assert_close(update, -2.0 * dense.transpose(1, 2) @ grad,
                               rtol=1e-4, atol=1e-4)

    inputs_grad = windows.input_gradient(grad, weight, packings)
    full = grad @ weight.transpose(1, 2)  # (M, B, 391)
    inside = torch.zeros_like(dense)
    mask = dense_inputs(torch.ones_like(packed), torch.zeros(members, 1), packings, variants)
    inside[mask == 1] = full[mask == 1]
    torch.testing.assert_close(
        dense_inputs(inputs_grad, torch.zeros(members, 1), packings, variants), inside,
        rtol=1e-4, atol=1e-4)
    outside = (full * (1 - mask)).sum(dim=(1, 2))
    torch.testing.assert_close(windows.constant_gradient(grad, tails, packings), outside,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "gelu"])
def test_activation_ignores_value_position(activation: str) -> None:
    """torch computes the values past a tensor's last SIMD vector by a scalar formula.
    The activations compute every value by the vector one."""
    act = ACTIVATIONS[activation]
    generator = torch.Generator().manual_seed(4)
    values = torch.randn(4 * VECTOR_MULTIPLE, generator=generator)
    grads = torch.randn(4 * VECTOR_MULTIPLE, generator=generator)
    whole_out = act.forward_(values.clone())
    whole_grad = act.backward(grads, whole_out, values)
    for count in (1, 7, VECTOR_MULTIPLE + 5, 3 * VECTOR_MULTIPLE - 1):
        out = act.forward_(values[:count].clone())
        assert torch.equal(out, whole_out[:count]), count
        grad = act.backward(grads[:count], out, values[:count])
        assert torch.equal(grad, whole_grad[:count]), count
