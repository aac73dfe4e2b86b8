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


@dataclass(frozen=True)
class Activation:
    """An activation applied in place, and its derivative from the saved tensors.

    ``backward(grad, output, input, out)`` writes the gradient with respect to the
    input into ``out`` (a new tensor when None) and returns it. ``needs_input`` is
    True when that derivative needs the input kept. A ``monotone`` activation
    commutes with max-pooling, so the front pools first and activates half as many
    values.
    """

    forward_: Callable[[torch.Tensor], torch.Tensor]
    backward_kernel: Callable[..., torch.Tensor]
    needs_input: bool = False
    monotone: bool = True

    def backward(self, grad: torch.Tensor, output: torch.Tensor, input: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(grad)
        return self.backward_kernel(grad, output, input, out)


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
