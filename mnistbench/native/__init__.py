"""Compiled kernels for models with the convolution front on the CPU, with torch's
operations as the fallback.

In torch's operations, the front's element-wise work took a dozen operations per
seed and band, each a pass over memory or a Python call: three taps, a bias, a
max-pool and the gradient sums of four parameters. So did the first layer's constant
windows and its products over the bands. The hidden layer's bias, activation and
dropout took four passes. ``front.c``, ``tails.c``, ``bands.c`` and ``hidden.c`` do
each in one call per step.
:mod:`mnistbench.native.build` compiles them with the system's C compiler on first use
and caches the library, so every worker process loads the same one.

    if native.available():
        native.front_forward(windows, layout, packings, taps, bias, "max", pooled)
        sums = native.front_sums(windows, layout, packings, taps, bias, "max", grad)

Where no compiler is found or the build fails, ``available()`` is False and the engine
uses torch's operations. A run's numbers then differ from the first rounding on, and
a run that is sensitive to them (ReLU at a high learning rate) can end far from the
other. Set ``MNISTBENCH_NATIVE=0`` to use torch's operations on purpose.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mnistbench.native.build import NATIVE_ENV, BuildError, build, enabled, load

if TYPE_CHECKING:
    from mnistbench.windows import Packing, WindowLayout

log = logging.getLogger(__name__)

MODES = {"plain": 0, "max": 1, "pair": 2}
# The activations whose derivative front_sums computes from their output.
DERIVATIVES = {"relu": 1, "sigmoid": 2, "tanh": 3}
# The activations that front_forward and hidden_forward apply themselves. ReLU is
# exact in either place; the sigmoid differs from torch's kernel in the last bits.
# tanh and GELU stay in torch's kernels.
ACTIVATIONS = {"relu": 1, "sigmoid": 2}

# Arguments both kernels start with: the windows, their seed and example strides, the
# window layout, the bands, offsets and band counts, the maximum band count, seeds and
# variants.
_COMMON = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
           ctypes.c_int64]


class NativeError(RuntimeError):
    """A compiled kernel failed where it should not have: out of memory."""


def available() -> bool:
    """Load the compiled kernels, building them on the first call; return whether they
    loaded."""
    return _library() is not None


def runs_on(device: torch.device) -> bool:
    """Return whether the compiled kernels do the front's work for tensors on ``device``:
    on the CPU when they loaded, never on a GPU."""
    return device.type == "cpu" and available()


def kernels_id() -> str:
    """Return what computes the front on the CPU, for run keys: ``native-`` and the
    library's build hash (of the sources, the compiler, its flags and its version), or
    ``torch``."""
    if not available():
        return "torch"
    loaded = _loaded()
    return "native" if loaded is None else "native-" + loaded[1].stem.removeprefix("kernels-")


def _library() -> ctypes.CDLL | None:
    loaded = _loaded()
    return None if loaded is None else loaded[0]


@cache
def _loaded() -> tuple[ctypes.CDLL, Path] | None:
    """Build and load the kernels once per process: the library and its path, or None."""
    if not enabled():
        return None
    try:
        path = build()
        library = load(path)
    except BuildError as error:
        log.warning("%s. The convolution front uses torch's operations instead. Install "
                    "a C compiler or set $CC to use the compiled kernels, or set %s=0 to "
                    "turn them off without this warning", error, NATIVE_ENV)
        # Worker processes started from here then use torch's operations too, matching
        # the run keys computed here, and neither build nor warn again.
        os.environ[NATIVE_ENV] = "0"
        return None
    for name in ("front_forward", "front_sums"):
        getattr(library, name).restype = ctypes.c_int
    library.front_forward.argtypes = _COMMON + [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    library.front_sums.argtypes = _COMMON + [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    # bands, band counts, maximum band count, seeds, variants, batch
    bands = [pointer, pointer, size, size, size, size]
    library.first_layer_tails.restype = None
    library.first_layer_tails.argtypes = [pointer, size, size, *bands, pointer, pointer,
                                          pointer]
    library.first_layer_weight_tails.restype = ctypes.c_int
    library.first_layer_weight_tails.argtypes = [pointer, size, size, *bands, pointer, pointer,
                                                 ctypes.c_float]
    library.constant_gradient.restype = ctypes.c_int
    library.constant_gradient.argtypes = [pointer, size, *bands, pointer, pointer]
    # bands, offsets, band counts, maximum band count, seeds, variants, batch
    layout = [pointer, pointer, pointer, size, size, size, size]
    for name in ("bands_forward", "bands_input_gradient", "bands_weight_gradient"):
        getattr(library, name).restype = ctypes.c_int
    library.bands_forward.argtypes = [pointer, size, pointer, size, size, *layout, pointer]
    library.bands_input_gradient.argtypes = [pointer, pointer, size, size, *layout, pointer,
                                             size, size]
    library.bands_weight_gradient.argtypes = [pointer, size, pointer, pointer, size, size,
                                              *layout, ctypes.c_float]
    library.hidden_forward.restype = None
    library.hidden_forward.argtypes = [pointer, pointer, size, size, size, ctypes.c_int,
                                       pointer, size, pointer, pointer, pointer, pointer]
    return library, path


def _band_arrays(packings: Sequence[Packing]) -> tuple[torch.Tensor, ...]:
    return _band_arrays_of(tuple(packings))


# A step calls up to five kernels with the same packings, so their arrays are built once.
@lru_cache(maxsize=8)
def _band_arrays_of(packings: tuple[Packing, ...]) -> tuple[torch.Tensor, ...]:
    """Flatten each seed's bands ``(S, max_bands, 3)``, offsets ``(S, max_bands + 1)``
    and band count ``(S,)`` into int64 tensors, padded with zeros."""
    max_bands = max(len(p.bands) for p in packings)
    bands, offsets = [], []
    for packing in packings:
        missing = max_bands - len(packing.bands)
        bands += [value for band in packing.bands for value in band] + [0] * (3 * missing)
        offsets += list(packing.offsets) + [0] * missing
    return (torch.tensor(bands, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64),
            torch.tensor([len(p.bands) for p in packings], dtype=torch.int64))


def _common(windows: torch.Tensor, layout: WindowLayout, packings: Sequence[Packing],
            members: int) -> tuple[list, tuple[torch.Tensor, ...]]:
    """Arguments shared by both kernels, and the arrays they point into (kept alive)."""
    assert windows.dtype == torch.uint8
    assert windows.device.type == "cpu"
    assert windows.stride(2) == 1
    assert windows.stride(1) == windows.shape[2]
    seeds = len(packings)
    assert windows.shape[0] == seeds
    assert members % seeds == 0
    arrays = _band_arrays(packings)
    args = [windows.data_ptr(), windows.stride(0), windows.stride(1), layout.pixels,
            layout.count, *(a.data_ptr() for a in arrays),
            arrays[0].shape[0] // (3 * seeds), seeds, members // seeds]
    return args, arrays


def front_forward(windows: torch.Tensor, layout: WindowLayout, packings: Sequence[Packing],
                  taps: torch.Tensor, bias: torch.Tensor, mode: str, out: torch.Tensor,
                  second: torch.Tensor | None = None, activation: str | None = None) -> None:
    """Write every run's convolution outputs at its seed's packed windows.

    Args:
        windows: uint8 ``(S, B, pixels * count)``, each seed's batch as its packing
            orders it. The seed stride may be 0 (one batch for every seed).
        taps: ``(M, 3)``; bias: ``(M, 1)``.
        mode: ``plain`` (no pooling): ``out`` gets the outputs. ``max``: ``out`` gets
            the larger output of each pooled pair. ``pair``: ``out`` gets the even
            outputs and ``second`` the odd ones.
        out, second: ``(M, L)`` views whose rows may be strided. Past each seed's
            length they get zeros.
        activation: one of :data:`ACTIVATIONS`, applied to ``out`` in the ``plain`` and
            ``max`` modes; None applies none.
    """
    members, width = out.shape
    args, arrays = _common(windows, layout, packings, members)
    assert out.stride(1) == 1
    assert second is None or second.stride() == out.stride()
    assert (second is not None) == (mode == "pair")
    assert activation is None or mode != "pair"
    taps, bias = taps.contiguous(), bias.contiguous()
    status = _library().front_forward(
        *args, taps.data_ptr(), bias.data_ptr(), MODES[mode],
        0 if activation is None else ACTIVATIONS[activation], out.data_ptr(),
        None if second is None else second.data_ptr(), out.stride(0), width)
    if status != 0:
        raise NativeError("front_forward ran out of memory")


def front_sums(windows: torch.Tensor, layout: WindowLayout, packings: Sequence[Packing],
               taps: torch.Tensor, bias: torch.Tensor, mode: str, grad: torch.Tensor, *,
               other: torch.Tensor | None = None, activation: str | None = None,
               output: torch.Tensor | None = None) -> torch.Tensor:
    """Sum every run's gradient against its convolution's inputs: ``(M, 4)``, the
    gradients of the three taps and the bias over the packed windows.

    ``grad``, ``other`` and ``output`` are ``(M, L)`` views with one row stride.
    ``plain``: ``grad`` is the outputs' gradient. ``max``: the pooled output's; the
    kernel computes each pair again from ``taps`` and ``bias`` to route it. ``pair``:
    ``grad`` and ``other`` are the even and the odd outputs' gradients. With an
    ``activation`` from :data:`DERIVATIVES` (``plain`` and ``max``), ``grad`` is the
    gradient of the activation's ``output``.
    """
    members = grad.shape[0]
    args, arrays = _common(windows, layout, packings, members)
    for tensor in (other, output):
        assert tensor is None or tensor.stride() == grad.stride()
    assert grad.stride(1) == 1
    assert (activation is None) == (output is None)
    taps, bias = taps.contiguous(), bias.contiguous()
    sums = torch.empty(members, 4)
    status = _library().front_sums(
        *args, taps.data_ptr(), bias.data_ptr(), MODES[mode],
        0 if activation is None else DERIVATIVES[activation], grad.data_ptr(),
        None if output is None else output.data_ptr(),
        None if other is None else other.data_ptr(), grad.stride(0), sums.data_ptr())
    if status != 0:
        raise NativeError("front_sums ran out of memory")
    return sums


def _band_args(packings: Sequence[Packing], members: int) -> tuple[list, tuple]:
    arrays = _band_arrays(packings)
    seeds = len(packings)
    return ([arrays[0].data_ptr(), arrays[2].data_ptr(), arrays[0].shape[0] // (3 * seeds),
             seeds, members // seeds, packings[0].batch], arrays)


def _band_layout(packings: Sequence[Packing], members: int) -> tuple[list, tuple]:
    arrays = _band_arrays(packings)
    seeds = len(packings)
    return ([arrays[0].data_ptr(), arrays[1].data_ptr(), arrays[2].data_ptr(),
             arrays[0].shape[0] // (3 * seeds), seeds, members // seeds, packings[0].batch],
            arrays)


def bands_forward(packed: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                  packings: Sequence[Packing]) -> None:
    """Write the first layer's output inside each seed's bands to ``out`` ``(M, B, H)``:
    the packed inputs ``(M, L)`` against the weights ``(M, windows, H)``, without the
    constant windows."""
    members, windows, hidden = weight.shape
    for tensor in (weight, out):
        assert tensor.is_contiguous()
    assert packed.stride(1) == 1
    args, arrays = _band_layout(packings, members)
    status = _library().bands_forward(packed.data_ptr(), packed.stride(0), weight.data_ptr(),
                                      windows, hidden, *args, out.data_ptr())
    if status != 0:
        raise NativeError("bands_forward ran out of memory")


def bands_input_gradient(grad: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                         packings: Sequence[Packing]) -> None:
    """Write the gradient of the packed inputs to ``out`` ``(M, L)`` from the output
    gradient ``grad`` ``(M, B, H)``, with zeros past each seed's packed length."""
    members, windows, hidden = weight.shape
    for tensor in (grad, weight):
        assert tensor.is_contiguous()
    assert out.stride(1) == 1
    args, arrays = _band_layout(packings, members)
    status = _library().bands_input_gradient(grad.data_ptr(), weight.data_ptr(), windows,
                                             hidden, *args, out.data_ptr(), out.stride(0),
                                             out.shape[1])
    if status != 0:
        raise NativeError("bands_input_gradient ran out of memory")


def bands_weight_gradient(out: torch.Tensor, packed: torch.Tensor, grad: torch.Tensor,
                          packings: Sequence[Packing], alpha: float) -> None:
    """Add ``alpha`` times the weight gradient inside each seed's bands to ``out`` ``(M,
    windows, H)``, from the packed inputs ``(M, L)`` and the output gradient ``grad``
    ``(M, B, H)``."""
    members, windows, hidden = out.shape
    assert out.is_contiguous()
    grad = grad.contiguous()
    assert packed.stride(1) == 1
    args, arrays = _band_layout(packings, members)
    status = _library().bands_weight_gradient(packed.data_ptr(), packed.stride(0),
                                              grad.data_ptr(), out.data_ptr(), windows, hidden,
                                              *args, alpha)
    if status != 0:
        raise NativeError("bands_weight_gradient ran out of memory")


def first_layer_tails(weight: torch.Tensor, out: torch.Tensor, constant: torch.Tensor,
                      packings: Sequence[Packing]) -> torch.Tensor:
    """Add each example's constant windows to the first layer's output ``out``
    ``(M, B, H)``, as :func:`mnistbench.windows.first_layer` does.

    Returns the sums of the weight rows past each band's stop, ``(M, bands, H)``. They
    are zero for the bands that a seed lacks.
    """
    members, windows, hidden = weight.shape
    assert weight.is_contiguous()
    assert out.is_contiguous()
    args, arrays = _band_args(packings, members)
    tails = torch.empty(members, arrays[0].shape[0] // (3 * len(packings)), hidden)
    constant = constant.contiguous()
    _library().first_layer_tails(weight.data_ptr(), windows, hidden, *args,
                                 constant.data_ptr(), out.data_ptr(), tails.data_ptr())
    return tails


def first_layer_weight_tails(out: torch.Tensor, grad: torch.Tensor, constant: torch.Tensor,
                             packings: Sequence[Packing], alpha: float) -> None:
    """Add ``alpha`` times the constant windows' share of the weight gradient to ``out``
    ``(M, windows, H)``, from the output gradient ``grad`` ``(M, B, H)``."""
    members, windows, hidden = out.shape
    assert out.is_contiguous()
    grad = grad.contiguous()
    args, arrays = _band_args(packings, members)
    constant = constant.contiguous()
    status = _library().first_layer_weight_tails(out.data_ptr(), windows, hidden, *args,
                                                 grad.data_ptr(), constant.data_ptr(), alpha)
    if status != 0:
        raise NativeError("first_layer_weight_tails ran out of memory")


def constant_gradient(grad: torch.Tensor, tails: torch.Tensor, packings: Sequence[Packing]
                      ) -> torch.Tensor:
    """Return each run's gradient with respect to its constant, ``(M,)``, from the output
    gradient ``grad`` ``(M, B, H)`` and the tails of :func:`first_layer_tails`."""
    members, _, hidden = grad.shape
    assert grad.is_contiguous()
    assert tails.is_contiguous()
    args, arrays = _band_args(packings, members)
    out = torch.empty(members)
    status = _library().constant_gradient(grad.data_ptr(), hidden, *args, tails.data_ptr(),
                                          out.data_ptr())
    if status != 0:
        raise NativeError("constant_gradient ran out of memory")
    return out


def hidden_forward(pre: torch.Tensor, bias: torch.Tensor, activation: str,
                   uniform: torch.Tensor | None, drop: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Add the bias to the first layer's output, activate it and apply dropout, in one pass.

    Args:
        pre: ``(M, B, H)``, overwritten with the activated hidden units.
        bias: ``(M, H)``.
        activation: one of :data:`ACTIVATIONS`.
        uniform: each seed's uniform draws ``(S, B, H)``, or None without dropout.
        drop: ``(M,)``, each run's dropout probability; a run drops a unit where its
            seed's draw is below it.

    Returns:
        The hidden units (``pre``), the dropout scale ``(M, B, H)`` (``1 / (1 - p)`` or
        0, or None without dropout) and the hidden units after dropout.
    """
    members, batch, hidden = pre.shape
    assert pre.is_contiguous()
    bias = bias.contiguous()
    keep = dropped = scale = None
    if uniform is not None:
        uniform = uniform.contiguous()
        assert uniform.shape == (uniform.shape[0], batch, hidden)
        assert members % uniform.shape[0] == 0
        drop = drop.contiguous()
        scale = 1.0 / (1.0 - drop)  # as torch's operations compute it
        keep, dropped = torch.empty_like(pre), torch.empty_like(pre)
    variants = members // uniform.shape[0] if uniform is not None else 1
    _library().hidden_forward(
        pre.data_ptr(), bias.data_ptr(), members, batch, hidden, ACTIVATIONS[activation],
        None if uniform is None else uniform.data_ptr(), variants,
        None if uniform is None else drop.data_ptr(),
        None if scale is None else scale.data_ptr(),
        None if keep is None else keep.data_ptr(),
        None if dropped is None else dropped.data_ptr())
    return pre, keep, pre if dropped is None else dropped
