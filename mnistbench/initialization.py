"""Initial parameters of one run, drawn from its seed's init stream.

    params = init_member(settings, seed)   # weight1 (n, width), bias1, weight2, bias2, ...

The schemes are PyTorch's default (``nn.Linear``'s uniform bounds), ``uniform`` (the
same), ``xavier``, ``kaiming`` and ``large_normal`` (N(0, 1), a deliberately bad one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mnistbench.matrix import Settings
from mnistbench.seeds import generator

NUM_CLASSES = 10
CONV_TAPS = 3


def _init_tensor(shape: Sequence[int], fan_in: int, fan_out: int, scheme: str, *, bias: bool,
                 gen: torch.Generator) -> torch.Tensor:
    """Draw one parameter tensor on the CPU from ``gen`` following an init scheme."""
    tensor = torch.empty(*shape)
    default_bound = 1.0 / math.sqrt(fan_in)
    if scheme in ("default", "uniform"):
        # PyTorch's Linear and Conv1d draw weights from kaiming_uniform(a=sqrt(5)),
        # which is U(+-1/sqrt(fan_in)), and biases from the same range; the manual
        # uniform init is therefore the same distribution.
        return tensor.uniform_(-default_bound, default_bound, generator=gen)
    if bias:
        return tensor.zero_()
    if scheme == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return tensor.uniform_(-bound, bound, generator=gen)
    if scheme == "kaiming":
        return tensor.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
    if scheme == "large_normal":
        return tensor.normal_(0.0, 1.0, generator=gen)
    raise ValueError(f"unknown init scheme {scheme!r}")


def init_member(settings: Settings, seed: int) -> dict[str, torch.Tensor]:
    """Draw one run's initial parameters from its seed's init stream.

    Each run gets a fresh generator, so its weights do not depend on the runs it is
    stacked with, and runs of one seed with the same shapes and scheme start equal.

    Returns:
        ``conv_weight`` (3,), ``conv_bias`` (1,) when the front is on, ``weight1``
        (n, width), ``bias1`` (width,), ``weight2`` (width, 10), ``bias2`` (10,).
    """
    gen = generator(seed, "init")
    scheme = settings.init
    params = {}
    if settings.conv:
        params["conv_weight"] = _init_tensor((CONV_TAPS,), CONV_TAPS, CONV_TAPS, scheme,
                                             bias=False, gen=gen)
        params["conv_bias"] = _init_tensor((1,), CONV_TAPS, CONV_TAPS, scheme, bias=True, gen=gen)
    n, width = settings.input_features(), settings.width
    # Drawn in nn.Linear's (out, in) layout, then transposed to (in, out) for x @ W.
    params["weight1"] = _init_tensor((width, n), n, width, scheme, bias=False, gen=gen).t()
    params["bias1"] = _init_tensor((width,), n, width, scheme, bias=True, gen=gen)
    params["weight2"] = _init_tensor((NUM_CLASSES, width), width, NUM_CLASSES, scheme,
                                     bias=False, gen=gen).t()
    params["bias2"] = _init_tensor((NUM_CLASSES,), width, NUM_CLASSES, scheme, bias=True, gen=gen)
    return params
