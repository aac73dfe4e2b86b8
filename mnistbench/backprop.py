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

from mnistbench.features import Band
from mnistbench.model import CONV_TAPS, Block, Trace


@dataclass
class Gradients:
    """Gradients of the summed member losses, in the block's parameter layout.

    ``params`` maps parameter names to gradients. ``factors`` is ``(a, b)``, whose
    product ``torch.bmm(a, b)`` is the first layer's weight gradient, or None once
    that gradient is in ``params["weight1"]``. With ``bands`` (per seed, as in
    :class:`~mnistbench.model.Trace`), ``a[s]`` is zero outside its seed's bands, and
    the products skip the rest.
    """

    params: dict[str, torch.Tensor]
    factors: tuple[torch.Tensor, torch.Tensor] | None
    bands: list[tuple[Band, ...]] | None = None

    def materialize(self, block: Block) -> None:
        """Write the first layer's weight gradient out, in place of its factors."""
        if self.factors is None:
            return
        a, b = self.factors
        if self.bands is None:
            self.params["weight1"] = block.matmul(a, b)
        else:
            grad = torch.zeros(a.shape[0], a.shape[1], b.shape[2], device=a.device)
            for s, seed_bands in enumerate(self.bands):
                for first, start, stop in seed_bands:
                    torch.mm(a[s, start:stop, first:], b[s, first:], out=grad[s, start:stop])
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
        log_probs = torch.log_softmax(logits, dim=-1)
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
    factors = (trace.first_input.transpose(1, 2), grad)
    grad = block.matmul(grad, params["weight1"].transpose(1, 2))  # (M, B, n)
    members, rows = block.members, trace.rows.transpose(1, 2)
    if not block.pool:
        grad = act.backward(grad.view(block.front_shape(batch)), trace.front_out, trace.front_in)
        taps = block.per_member_matmul(grad.view(members, 1, -1), rows)[:, 0]  # (M, 4)
        grads["conv_weight"] = taps[:, :CONV_TAPS].contiguous()
        grads["conv_bias"] = taps[:, CONV_TAPS:].contiguous()
        return Gradients(grads, factors)
    # Against the pooled rows, a pair's even output reads rows 0-2 and its odd output
    # reads rows 1-3. sums[m, j, k] is gradient row j times pixel row k.
    shares = torch.empty(block.front_shape(batch), device=grad.device).view(members, 2, -1)
    if act.monotone:
        # Pooled before the activation: the pooled unit passes its gradient to the
        # larger of its pair, the even one on a tie. Row 0 contains the whole gradient
        # and row 1 the odd share, so the even share is row 0 minus row 1.
        act.backward(grad, trace.front_out, None, out=shares[:, 0].view_as(grad))
        torch.ops.aten.threshold_backward.grad_input(
            shares[:, 0], trace.pool_gap.flatten(1), 0, grad_input=shares[:, 1])
        sums = block.per_member_matmul(shares, rows)  # (M, 2, 5)
        even, odd = sums[:, 0] - sums[:, 1], sums[:, 1]
    else:
        odd_share = torch.ops.aten.threshold_backward(grad, trace.pool_gap, 0).flatten(1)
        torch.sub(grad.flatten(1), odd_share, out=shares[:, 0])
        shares[:, 1] = odd_share
        front_grad = shares.view(block.front_shape(batch))
        act.backward(front_grad, trace.front_out, trace.front_in, out=front_grad)
        sums = block.per_member_matmul(shares, rows)
        even, odd = sums[:, 0], sums[:, 1]
    grads["conv_weight"] = even[:, :CONV_TAPS] + odd[:, 1:CONV_TAPS + 1]
    grads["conv_bias"] = even[:, CONV_TAPS + 1:] + odd[:, CONV_TAPS + 1:]
    return Gradients(grads, factors)
