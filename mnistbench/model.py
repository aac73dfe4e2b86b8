"""The model family, stacked: many runs of one seed as one set of batched parameters.

The model of one run is

    [Conv1d(1, 1, 3) -> activation] -> [max_pool1d(2)] -> Linear(n, width)
        -> activation -> [dropout] -> Linear(width, 10)

on the flattened 784-pixel image, where ``n`` is 784, 782 after the convolution, and
half of that after pooling.

A :class:`SeedBlock` holds ``V`` runs ("members") that share a seed index and the
model structure but may differ in init, learning rate, momentum, weight decay and
dropout. Because they share a seed they see the same batches, so without the
convolution front the first layer of all members is one wide matmul
``(batch, n) @ (n, V * width)``. With the front every member has its own input and
the first layer is a batched matmul ``(V, batch, n) @ (V, n, width)``. The
convolution is written as three shifted multiply-adds, which costs far less than
``nn.Conv1d`` for a single 3-tap filter.

    block = SeedBlock(members_settings, seed=0, device="cpu")
    logits, hidden = block.forward(images_uint8)    # (V, batch, 10), (V, batch, width)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mnistbench.matrix import Settings
from mnistbench.seeds import generator

IMAGE_PIXELS = 784
NUM_CLASSES = 10
CONV_TAPS = 3

# Settings that must agree for runs to train in one stack; the others (init, lr,
# momentum, weight_decay, dropout) may vary per member.
STRUCTURE_FIELDS = ("activation", "conv", "pool", "width", "loss", "optimizer", "batch_size",
                    "epochs", "train_subset", "precision")

ACTIVATIONS = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,
}


def structure_of(settings: Settings) -> tuple:
    """Return the part of the settings that decides whether runs can share a stack."""
    return tuple(getattr(settings, name) for name in STRUCTURE_FIELDS)


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


class SeedBlock:
    """Parameters and forward pass of ``V`` runs that share a seed and a structure."""

    def __init__(self, settings: Sequence[Settings], seed: int, device: torch.device | str
                 ) -> None:
        structures = {structure_of(s) for s in settings}
        assert len(structures) == 1, f"a block needs one structure; got {len(structures)}"
        self.settings = list(settings)
        self.seed = seed
        self.device = torch.device(device)
        first = self.settings[0]
        self.members = len(self.settings)
        self.width = first.width
        self.conv = first.conv
        self.pool = first.pool
        self.activation = ACTIVATIONS[first.activation]
        self.features = first.input_features()
        drawn = [init_member(s, seed) for s in self.settings]
        self.params: dict[str, torch.Tensor] = {}
        if self.conv:
            self.params["conv_weight"] = torch.stack([d["conv_weight"] for d in drawn])  # (V, 3)
            self.params["conv_bias"] = torch.stack([d["conv_bias"] for d in drawn])  # (V, 1)
            self.params["weight1"] = torch.stack([d["weight1"] for d in drawn])  # (V, n, H)
        else:
            # (n, V * H): member v owns columns v*H .. (v+1)*H - 1.
            self.params["weight1"] = torch.cat([d["weight1"] for d in drawn], dim=1)
        self.params["bias1"] = torch.stack([d["bias1"] for d in drawn])  # (V, H)
        self.params["weight2"] = torch.stack([d["weight2"] for d in drawn])  # (V, H, 10)
        self.params["bias2"] = torch.stack([d["bias2"] for d in drawn])  # (V, 10)
        for name, tensor in self.params.items():
            self.params[name] = tensor.contiguous().to(self.device).requires_grad_(True)
        self.dropout = torch.tensor([s.dropout for s in self.settings], device=self.device)
        self.uses_dropout = bool((self.dropout > 0).any())

    def member_view(self, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Return a view of a parameter (or its gradient) with the member dimension first."""
        tensor = self.params[name] if tensor is None else tensor
        if name == "weight1" and not self.conv:
            return tensor.view(self.features, self.members, self.width).transpose(0, 1)
        return tensor

    def broadcast(self, name: str, per_member: torch.Tensor) -> torch.Tensor:
        """Shape a ``(V,)`` tensor to broadcast against a parameter in its stored layout."""
        tensor = self.params[name]
        if name == "weight1" and not self.conv:
            return per_member.repeat_interleave(self.width).view(1, -1)
        return per_member.view(-1, *([1] * (tensor.dim() - 1)))

    def first_layer_input(self, images: torch.Tensor) -> torch.Tensor:
        """Map a batch of uint8 images ``(B, 784)`` to the first Linear's input.

        Returns:
            ``(B, n)`` shared by all members without the front, else ``(V, B, n)``.
        """
        x = images.to(torch.float32) * (1.0 / 255.0)
        if self.conv:
            w = self.params["conv_weight"][:, :, None, None]  # (V, 3, 1, 1)
            b = self.params["conv_bias"][:, :, None]  # (V, 1, 1)
            x = (w[:, 0] * x[None, :, :-2] + w[:, 1] * x[None, :, 1:-1]
                 + w[:, 2] * x[None, :, 2:] + b)  # (V, B, 782)
            x = self.activation(x)
        if self.pool:
            length = x.shape[-1] // 2 * 2
            x = x[..., :length].unflatten(-1, (length // 2, 2)).amax(dim=-1)
        return x

    def hidden_preactivation(self, first_input: torch.Tensor) -> torch.Tensor:
        """First Linear layer: returns ``(V, B, H)``."""
        bias = self.params["bias1"][:, None, :]
        if self.conv:
            return torch.baddbmm(bias, first_input, self.params["weight1"])
        batch = first_input.shape[0]
        wide = first_input @ self.params["weight1"]  # (B, V * H)
        return wide.view(batch, self.members, self.width).transpose(0, 1) + bias

    def forward(self, images: torch.Tensor, dropout_uniform: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute logits ``(V, B, 10)`` and hidden pre-activations ``(V, B, H)``.

        Args:
            images: uint8 ``(B, 784)``.
            dropout_uniform: uniform draws ``(B, H)`` shared by the block (training
                only); member v drops a unit where the draw is below its probability.
        """
        pre = self.hidden_preactivation(self.first_layer_input(images))
        hidden = self.activation(pre)
        if dropout_uniform is not None and self.uses_dropout:
            p = self.dropout[:, None, None]
            keep = (dropout_uniform[None] >= p).to(hidden.dtype) / (1.0 - p)
            hidden = hidden * keep
        logits = torch.baddbmm(self.params["bias2"][:, None, :], hidden, self.params["weight2"])
        return logits, pre


def member_losses(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss over the batch for each member.

    Args:
        logits: ``(V, B, 10)``.
        labels: int64 ``(B,)``.
        loss: ``cross_entropy`` or ``mse`` (mean squared error against one-hot targets,
            averaged over batch and classes like ``nn.MSELoss``).

    Returns:
        ``(V,)`` float32.
    """
    members, batch, classes = logits.shape
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape "
            f"{tuple(logits.shape)}; expected labels of shape ({batch},)"
        )
    logits = logits.float()
    if loss == "cross_entropy":
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = log_probs.gather(-1, labels.view(1, batch, 1).expand(members, batch, 1))
        return -picked.squeeze(-1).mean(dim=1)
    if loss == "mse":
        target = F.one_hot(labels, classes).to(logits.dtype)  # (B, 10)
        if target.shape != logits.shape[1:]:
            raise ValueError(
                f"one-hot target of shape {tuple(target.shape)} does not match output of "
                f"shape {tuple(logits.shape[1:])}; MSE never broadcasts a mismatch"
            )
        return (logits - target[None]).pow(2).mean(dim=(1, 2))
    raise ValueError(f"unknown loss {loss!r}; expected cross_entropy or mse")
