"""The activations of the model family, each with its derivative written out.

    act = ACTIVATIONS["relu"]
    output = act.forward_(pre)                       # in place
    grad_pre = act.backward(grad_out, output, pre)   # PyTorch's own backward kernel
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# torch's element-wise loops compute a tensor's values in SIMD vectors, and the values
# past the last whole vector (twice unrolled) by a scalar formula. For sigmoid, GELU
# and their derivatives the two formulas differ in the low bits, so a run's values
# would depend on where they sit in a stack. The activations compute those trailing
# values again in a zero-padded vector of this many floats, which covers every SIMD
# width torch uses.
VECTOR_MULTIPLE = 64


@dataclass(frozen=True)
class Activation:
    """An activation applied in place, and its derivative from the saved tensors.

    ``forward_(x)`` applies the activation in place where the derivative does not
    need the input, and returns the result. ``backward(grad, output, input, out)``
    writes the gradient with respect to the input into ``out`` (a new tensor when
    None) and returns it. ``needs_input`` is True when that derivative needs the
    input kept. A ``monotone`` activation commutes with max-pooling, so the front
    pools first and activates half as many values.

    Every value is computed by the vector formula, wherever it sits in the tensor. A
    non-contiguous tensor must have rows whose length is a multiple of
    ``VECTOR_MULTIPLE``.
    """

    forward_kernel: Callable[[torch.Tensor], torch.Tensor]
    backward_kernel: Callable[..., torch.Tensor]
    needs_input: bool = False
    monotone: bool = True

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        tail = _scalar_tail(x)
        saved = _padded_tail(x, tail)
        result = self.forward_kernel(x)
        if tail:
            result.view(-1)[-tail:] = self.forward_kernel(saved)[:tail]
        return result

    def backward(self, grad: torch.Tensor, output: torch.Tensor, input: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(grad)
        tail = _scalar_tail(out)
        saved = [_padded_tail(t, tail) for t in (grad, output, input)]
        self.backward_kernel(grad, output, input, out)
        if tail:
            out.view(-1)[-tail:] = self.backward_kernel(*saved, torch.empty_like(saved[0]))[:tail]
        return out


def _scalar_tail(tensor: torch.Tensor) -> int:
    """Return how many trailing values of ``tensor`` an element-wise loop may compute by
    its scalar formula."""
    if tensor.is_contiguous():
        return tensor.numel() % VECTOR_MULTIPLE
    assert tensor.stride(-1) == 1, "rows must be contiguous"
    assert tensor.shape[-1] % VECTOR_MULTIPLE == 0, (
        f"rows of {tensor.shape[-1]} values would end in a scalar loop")
    return 0


def _padded_tail(tensor: torch.Tensor | None, tail: int) -> torch.Tensor | None:
    """Copy the last ``tail`` values of ``tensor`` into a zero-padded vector."""
    if tensor is None or not tail:
        return None
    padded = torch.zeros(VECTOR_MULTIPLE, dtype=tensor.dtype, device=tensor.device)
    padded[:tail] = tensor.reshape(-1)[-tail:]
    return padded


# The derivatives are PyTorch's own backward kernels, written into a given tensor.
def _relu_backward(grad, output, _input, out):
    return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=out)


def _sigmoid_backward(grad, output, _input, out):
    return torch.ops.aten.sigmoid_backward.grad_input(grad, output, grad_input=out)


def _tanh_backward(grad, output, _input, out):
    return torch.ops.aten.tanh_backward.grad_input(grad, output, grad_input=out)


def _gelu_backward(grad, _output, input, out):
    return torch.ops.aten.gelu_backward.grad_input(grad, input, grad_input=out)


ACTIVATIONS = {
    "relu": Activation(torch.relu_, _relu_backward),
    "sigmoid": Activation(torch.sigmoid_, _sigmoid_backward),
    "tanh": Activation(torch.tanh_, _tanh_backward),
    "gelu": Activation(F.gelu, _gelu_backward, needs_input=True, monotone=False),
}
