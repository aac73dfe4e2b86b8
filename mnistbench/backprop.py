"""The backward pass of a stacked training step, written out layer by layer.

    trace = block.forward(images, dropout_uniform)
    losses, logit_grad = member_losses(trace.logits, labels, "cross_entropy", with_grad=True)
    grads = gradients(block, trace, logit_grad)

Each run's loss is its own batch mean and the stack minimizes their sum, so every run
receives exactly its own gradient. The first layer's weight gradient is returned as
two factors ``(a, b)`` with gradient ``a @ b`` (batched): the optimizer can then add
``-lr * a @ b`` to the weights inside one matmul instead of writing the gradient out
first. The derivatives of the activations are PyTorch's own backward kernels, so a
step computes what autograd would, without autograd's bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mnistbench import native
from mnistbench.features import Band
from mnistbench.front import front_constant
from mnistbench.initialization import CONV_TAPS
from mnistbench.model import Block, Trace
from mnistbench.windows import (Packing, add_weight_gradient, constant_gradient,
                                input_gradient, seed_members)


@dataclass
class Gradients:
    """Gradients of the summed member losses, in the block's parameter layout.

    ``params`` maps parameter names to gradients. ``factors`` is ``(a, b)``, whose
    product ``torch.bmm(a, b)`` is the first layer's weight gradient, or None once
    that gradient is in ``params["weight1"]``. With ``bands`` (per seed, as in
    :class:`~mnistbench.model.Trace`), ``a[s]`` is zero outside its seed's bands, and
    the products skip the rest. With ``packings`` (the convolution front's, as in the
    trace), ``a`` is the packed input and ``constant`` each run's value outside it.
    :func:`~mnistbench.windows.add_weight_gradient` describes that product.
    """

    params: dict[str, torch.Tensor]
    factors: tuple[torch.Tensor, torch.Tensor] | None
    bands: list[tuple[Band, ...]] | None = None
    packings: list[Packing] | None = None
    constant: torch.Tensor | None = None

    def add_weight1(self, out: torch.Tensor, alpha: float,
                    scale: torch.Tensor | None = None) -> None:
        """Add ``alpha`` times the first layer's weight gradient to ``out``, in place,
        with ``b`` first multiplied by ``scale`` (broadcast), as a learning rate."""
        a, b = self.factors
        if scale is not None:
            b = b * scale
        if self.packings is not None:
            add_weight_gradient(out, a, b, self.constant, self.packings, alpha)
        elif self.bands is None:
            out.baddbmm_(a, b, alpha=alpha)
        else:
            for s, seed_bands in enumerate(self.bands):
                for first, start, stop in seed_bands:
                    out[s, start:stop].addmm_(a[s, start:stop, first:], b[s, first:],
                                              alpha=alpha)

    def materialize(self, block: Block) -> None:
        """Write the first layer's weight gradient out, in place of its factors."""
        if self.factors is None:
            return
        if self.bands is None and self.packings is None:
            self.params["weight1"] = block.matmul(*self.factors)
        else:
            grad = torch.zeros_like(block.params["weight1"])
            self.add_weight1(grad, 1.0)
            self.params["weight1"] = grad
        self.factors = None


def member_losses(logits: torch.Tensor, labels: torch.Tensor, loss: str, *,
                  with_grad: bool = False
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean loss over the batch for each member, and optionally its gradient.

    Args:
        logits: ``(M, B, 10)``.
        labels: int64 ``(M, B)``, or ``(B,)`` shared by all members.
        loss: ``cross_entropy`` or ``mse`` (mean squared error against one-hot targets,
            averaged over batch and classes like ``nn.MSELoss``).
        with_grad: also return the gradient of the losses' sum with respect to the
            logits, ``(M, B, 10)``.

    Returns:
        ``(M,)`` float32, or that and the gradient.
    """
    members, batch, classes = logits.shape
    if labels.dim() == 1 and labels.shape[0] == batch:
        labels = labels.expand(members, batch)
    if labels.shape != (members, batch):
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape "
            f"{tuple(logits.shape)}; expected labels of shape ({batch},) or "
            f"({members}, {batch})"
        )
    logits = logits.float()
    if loss == "cross_entropy":
        # The forward pass leaves the logits as a transposed view of (M, 10, B). Over
        # that layout's middle dimension, log_softmax runs about 30x faster than over
        # a last dimension of 10.
        log_probs = torch.log_softmax(logits.transpose(1, 2), dim=1).transpose(1, 2)
        picked = log_probs.gather(-1, labels[..., None])
        losses = -picked.squeeze(-1).mean(dim=1)
        if not with_grad:
            return losses
        # d(mean of -log p[label]) / d logits = (softmax - one_hot) / batch
        grad = log_probs.exp_().scatter_(-1, labels[..., None], picked.exp_().sub_(1.0))
        return losses, grad.mul_(1.0 / batch)
    if loss == "mse":
        target = F.one_hot(labels, classes).to(logits.dtype)  # (M, B, 10)
        if target.shape != logits.shape:
            raise ValueError(
                f"one-hot target of shape {tuple(target.shape)} does not match output of "
                f"shape {tuple(logits.shape)}; MSE never broadcasts a mismatch"
            )
        diff = logits - target
        losses = diff.pow(2).mean(dim=(1, 2))
        if not with_grad:
            return losses
        return losses, diff.mul_(2.0 / (batch * classes))
    raise ValueError(f"unknown loss {loss!r}; expected cross_entropy or mse")


def gradients(block: Block, trace: Trace, logit_grad: torch.Tensor) -> Gradients:
    """Backpropagate ``logit_grad`` (M, B, 10) through the block's forward pass."""
    params, act = block.params, block.activation
    grads = {
        "weight2": block.matmul(logit_grad.transpose(1, 2), trace.dropped).transpose(1, 2),
        "bias2": logit_grad.sum(dim=1),
    }
    grad = block.matmul(logit_grad, params["weight2"].transpose(1, 2))  # (M, B, H)
    if trace.keep is not None:
        grad.mul_(trace.keep)
    grad = act.backward(grad, trace.hidden, trace.pre)  # d loss / d pre-activation
    grads["bias1"] = grad.sum(dim=1)
    batch = grad.shape[1]
    if block.shared_weight1:
        # Each seed's runs side by side, as in the stored (S, n, V * H) layout.
        wide = grad.view(block.seed_count, block.variants, batch, block.width).transpose(1, 2)
        factors = (trace.first_input.transpose(1, 2),
                   wide.reshape(block.seed_count, batch, block.variants * block.width))
        return Gradients(grads, factors, trace.bands)
    return _front_gradients(block, trace, grads, grad)


def _front_gradients(block: Block, trace: Trace, grads: dict[str, torch.Tensor],
                     grad: torch.Tensor) -> Gradients:
    """Finish the gradients of a block with the convolution front, from the gradient
    ``grad`` ``(M, B, H)`` with respect to the hidden pre-activation."""
    act, weight, packings = block.activation, block.params["weight1"], trace.packings
    members, batch = block.members, grad.shape[1]
    if trace.bands is None:  # one whole band: the plain (M, B, n) layout, then padding
        plain = batch * weight.shape[1]
        factors = (trace.first_input[:, :plain].view(members, batch, -1).transpose(1, 2), grad)
        result = Gradients(grads, factors)
        inputs_grad = torch.empty_like(trace.first_input)
        inputs_grad[:, :plain] = block.matmul(grad, weight.transpose(1, 2)).view(members, -1)
        inputs_grad[:, plain:] = 0.0
    else:
        constant = front_constant(block)
        result = Gradients(grads, (trace.first_input, grad), trace.bands, packings, constant)
        inputs_grad = input_gradient(grad, weight, packings)  # (M, L)
    if trace.rows.dtype == torch.uint8:  # the compiled kernels read the windows
        sums = _native_taps_sums(block, trace, inputs_grad)  # (M, 4)
    elif not block.pool:
        shares = act.backward(inputs_grad, trace.front_out, trace.front_in)
        sums = _taps_sums(block, shares[:, None], trace.rows, packings)[:, 0]
    else:
        even, odd = _pooled_taps_sums(block, trace, inputs_grad)
        sums = torch.cat([even[:, :CONV_TAPS] + odd[:, 1:CONV_TAPS + 1],
                          even[:, CONV_TAPS + 1:] + odd[:, CONV_TAPS + 1:]], dim=1)
    grads["conv_weight"] = sums[:, :CONV_TAPS].contiguous()
    grads["conv_bias"] = sums[:, CONV_TAPS:].contiguous()
    if trace.bands is not None:
        # Outside the packed windows every output equals the bias, and with pooling the
        # even output passes the gradient on. The bias gets act'(b) times its share.
        bias = block.params["conv_bias"]
        slope = act.backward(torch.ones_like(bias), result.constant, bias)
        grads["conv_bias"] += slope * constant_gradient(grad, trace.tails, packings)[:, None]
    return result


def _native_taps_sums(block: Block, trace: Trace, inputs_grad: torch.Tensor) -> torch.Tensor:
    """Return the taps' and the bias's gradients ``(M, 4)`` from the compiled kernels,
    from the gradient ``(M, L)`` with respect to the first Linear's packed inputs."""
    act, name = block.activation, block.settings[0].activation
    inputs = (trace.rows, block.layout, trace.packings, block.params["conv_weight"],
              block.params["conv_bias"])
    if block.pool and not act.monotone:
        shares = _pair_shares(block, trace, inputs_grad)
        return native.front_sums(*inputs, "pair", shares[:, 0], other=shares[:, 1])
    mode = "max" if block.pool else "plain"
    if name in native.DERIVATIVES:  # the kernel applies the derivative as it sums
        return native.front_sums(*inputs, mode, inputs_grad, activation=name,
                                 output=trace.front_out)
    shares = act.backward(inputs_grad, trace.front_out, trace.front_in)
    return native.front_sums(*inputs, mode, shares)


def _pair_shares(block: Block, trace: Trace, inputs_grad: torch.Tensor) -> torch.Tensor:
    """Return the gradient ``(M, 2, L)`` with respect to the even and the odd outputs
    before an activation that does not commute with pooling: the pooled unit passes
    its gradient to the larger of its pair, the even one on a tie."""
    shares = torch.empty(block.members, 2, inputs_grad.shape[1], device=inputs_grad.device)
    odd_share = torch.ops.aten.threshold_backward(inputs_grad, trace.pool_gap, 0)
    torch.sub(inputs_grad, odd_share, out=shares[:, 0])
    shares[:, 1] = odd_share
    return block.activation.backward(shares, trace.front_out, trace.front_in, out=shares)


def _pooled_taps_sums(block: Block, trace: Trace, inputs_grad: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the even and the odd outputs' gradient against a window's rows, ``(M, 5)``
    each, from the gradient ``(M, L)`` with respect to the pooled inputs.

    Against a window's rows, a pair's even output reads rows 0-2 and its odd output
    rows 1-3.
    """
    act = block.activation
    if act.monotone:
        shares = torch.empty(block.members, 2, inputs_grad.shape[1], device=inputs_grad.device)
        # Pooled before the activation: the pooled unit passes its gradient to the
        # larger of its pair, the even one on a tie. Row 0 contains the whole gradient
        # and row 1 the odd share, so the even share is row 0 minus row 1.
        act.backward(inputs_grad, trace.front_out, None, out=shares[:, 0])
        torch.ops.aten.threshold_backward.grad_input(
            shares[:, 0], trace.pool_gap, 0, grad_input=shares[:, 1])
        sums = _taps_sums(block, shares, trace.rows, trace.packings)  # (M, 2, 5)
        return sums[:, 0] - sums[:, 1], sums[:, 1]
    sums = _taps_sums(block, _pair_shares(block, trace, inputs_grad), trace.rows,
                      trace.packings)
    return sums[:, 0], sums[:, 1]


def _taps_sums(block: Block, shares: torch.Tensor, rows: torch.Tensor,
               packings: list[Packing]) -> torch.Tensor:
    """Multiply each run's gradient shares ``(M, outputs, L)`` by its seed's packed rows
    ``(S, pixels + 1, L)``, over each seed's own length: ``(M, outputs, pixels + 1)``."""
    out = torch.empty(block.members, shares.shape[1], rows.shape[1], device=rows.device)
    for s, runs, packing in seed_members(packings, block.variants):
        length = packing.length
        # Each run's product is its own matrix, so it does not depend on the stack.
        torch.bmm(shares[runs, :, :length],
                  rows[s, :, :length].t().expand(block.variants, -1, -1), out=out[runs])
    return out
