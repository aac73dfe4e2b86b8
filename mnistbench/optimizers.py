"""Optimizers written out for a stack of runs: SGD with momentum and weight decay, and Adam.

    optimizer = Optimizer(block, "sgd")    # learning rate, momentum, decay per member
    optimizer.step(gradients)              # from mnistbench.backprop.gradients
    optimizer.freeze(members)              # zero and stop the given members

Every hyperparameter may differ per run, so each is a tensor broadcast against the
block's parameter layout. They follow ``torch.optim.SGD`` and ``torch.optim.Adam``
with PyTorch's defaults, and a test trains the same run both ways.
"""

from __future__ import annotations

import torch

from mnistbench.backprop import Gradients
from mnistbench.model import Block

ADAM_BETAS = (0.9, 0.999)  # PyTorch's defaults
ADAM_EPS = 1e-8  # PyTorch's default


class Optimizer:
    """SGD (with momentum) or Adam over a block's parameters, hyperparameters per member."""

    def __init__(self, block: Block, kind: str) -> None:
        self.block = block
        self.kind = kind
        device = block.device
        self.lr = torch.tensor([s.lr for s in block.settings], device=device)
        momentum = torch.tensor([s.momentum for s in block.settings], device=device)
        decay = torch.tensor([s.weight_decay for s in block.settings], device=device)
        self.use_decay = bool((decay > 0).any())
        self.use_momentum = kind == "sgd" and bool((momentum > 0).any())
        self.step_count = 0
        self.state = {}
        for name, param in block.params.items():
            entry = {"decay": block.broadcast(name, decay)}
            if self.use_momentum:
                entry["momentum"] = block.broadcast(name, momentum)
                entry["buffer"] = torch.zeros_like(param)
            if kind == "adam":
                entry["m"] = torch.zeros_like(param)
                entry["v"] = torch.zeros_like(param)
            self.state[name] = entry
        self.refresh_lr()

    def refresh_lr(self) -> None:
        for name, entry in self.state.items():
            entry["lr"] = self.block.broadcast(name, self.lr)

    @torch.no_grad()
    def step(self, gradients: Gradients) -> None:
        """Update every parameter from its gradient, or ``weight1`` from its factors."""
        self.step_count += 1
        for name, param in self.block.params.items():
            entry = self.state[name]
            if name not in gradients.params:
                self._step_factored(param, entry, gradients)
                continue
            grad = gradients.params[name]
            if self.use_decay:
                grad = grad + entry["decay"] * param
            if self.kind == "sgd":
                if self.use_momentum:
                    grad = entry["buffer"].mul_(entry["momentum"]).add_(grad)
                param.addcmul_(entry["lr"], grad, value=-1.0)
                continue
            beta1, beta2 = ADAM_BETAS
            entry["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
            entry["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m_hat = entry["m"] / (1 - beta1**self.step_count)
            v_hat = entry["v"] / (1 - beta2**self.step_count)
            param.addcdiv_(entry["lr"] * m_hat, v_hat.sqrt_().add_(ADAM_EPS), value=-1.0)

    def _step_factored(self, param: torch.Tensor, entry: dict, gradients: Gradients) -> None:
        """Apply SGD to the first layer's weight, whose gradient is still in factors
        ``a @ b`` and is accumulated inside the matmul.

        The learning rate scales ``b``'s columns (or batches) per member, so the
        update needs no pass over the weights beyond the matmul's own.
        """
        assert self.kind == "sgd", "Adam needs the gradient written out"
        if self.use_momentum:
            buffer = entry["buffer"].mul_(entry["momentum"])
            if self.use_decay:
                buffer.addcmul_(entry["decay"], param)
            gradients.add_weight1(buffer, 1.0)
            param.addcmul_(entry["lr"], buffer, value=-1.0)
            return
        if self.use_decay:
            param.mul_(1.0 - entry["lr"] * entry["decay"])
        gradients.add_weight1(param, -1.0, entry["lr"])

    @torch.no_grad()
    def freeze(self, members: torch.Tensor) -> None:
        """Zero the weights and state of the given members and stop their updates."""
        self.lr[members] = 0.0
        self.refresh_lr()
        for name, param in self.block.params.items():
            self.block.zero_members(name, param, members)
            for key in ("buffer", "m", "v"):
                if key in self.state[name]:
                    self.block.zero_members(name, self.state[name][key], members)

