"""The model family, stacked: many runs of one seed as one set of batched parameters.

The model of one run is

    [Conv1d(1, 1, 3) -> activation] -> [max_pool1d(2)] -> Linear(n, width)
        -> activation -> [dropout] -> Linear(width, 10)

on the flattened 784-pixel image, where ``n`` is 784, 782 after the convolution, and
half of that after pooling.

A :class:`Block` contains ``M = S x V`` runs ("members"): ``V`` runs for each of ``S``
seed indexes, all of one model structure, which may differ in init, learning rate,
momentum, weight decay and dropout. Runs of one seed see the same batches, so
without the convolution front the first layer of a seed's runs is one wide matmul
``(batch, n) @ (n, V * width)``, and all seeds together one batched matmul
``(S, batch, n) @ (S, n, V * width)``. With the front every run has its own input and
the first layer is ``(M, batch, n) @ (M, n, width)``. The convolution is written as
three shifted multiply-adds, which costs far less than ``nn.Conv1d`` for a single
3-tap filter.

    block = Block(members_settings, seeds=[0, 1], device="cpu")
    logits, pre = block.forward(images_uint8)    # (M, batch, 10), (M, batch, width)
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


class Block:
    """Parameters and forward pass of ``S`` seeds x ``V`` runs that share a structure.

    Member ``m = s * V + v`` is run ``v`` of seed ``seeds[s]``. Every seed has the same
    number of runs, so all seeds train in the same batched matmuls: the per-operation
    cost of the Python loop is paid once per step, not once per seed.
    """

    def __init__(self, settings: Sequence[Settings], seeds: Sequence[int],
                 device: torch.device | str) -> None:
        structures = {structure_of(s) for s in settings}
        assert len(structures) == 1, f"a block needs one structure; got {len(structures)}"
        assert len(settings) % len(seeds) == 0, (
            f"{len(settings)} runs cannot be split evenly over {len(seeds)} seeds")
        self.settings = list(settings)
        self.seeds = list(seeds)
        self.device = torch.device(device)
        first = self.settings[0]
        self.members = len(self.settings)
        self.seed_count = len(self.seeds)
        self.variants = self.members // self.seed_count
        self.width = first.width
        self.conv = first.conv
        self.pool = first.pool
        self.activation = ACTIVATIONS[first.activation]
        self.features = first.input_features()
        drawn = [init_member(s, self.seeds[m // self.variants])
                 for m, s in enumerate(self.settings)]
        self.params: dict[str, torch.Tensor] = {}
        if self.conv:
            self.params["conv_weight"] = torch.stack([d["conv_weight"] for d in drawn])  # (M, 3)
            self.params["conv_bias"] = torch.stack([d["conv_bias"] for d in drawn])  # (M, 1)
            self.params["weight1"] = torch.stack([d["weight1"] for d in drawn])  # (M, n, H)
        else:
            # (S, n, V * H): run v of seed s owns columns v*H .. (v+1)*H - 1 of slice s.
            per_seed = [torch.cat([d["weight1"] for d in drawn[s * self.variants:
                                                              (s + 1) * self.variants]], dim=1)
                        for s in range(self.seed_count)]
            self.params["weight1"] = torch.stack(per_seed)
        self.params["bias1"] = torch.stack([d["bias1"] for d in drawn])  # (M, H)
        self.params["weight2"] = torch.stack([d["weight2"] for d in drawn])  # (M, H, 10)
        self.params["bias2"] = torch.stack([d["bias2"] for d in drawn])  # (M, 10)
        for name, tensor in self.params.items():
            self.params[name] = tensor.contiguous().to(self.device).requires_grad_(True)
        self.dropout = torch.tensor([s.dropout for s in self.settings], device=self.device)
        self.uses_dropout = bool((self.dropout > 0).any())

    def _shared_weight1(self, name: str) -> bool:
        return name == "weight1" and not self.conv

    def member_sums(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a parameter-shaped tensor over everything but the member: ``(M,)``."""
        if self._shared_weight1(name):
            view = tensor.view(self.seed_count, self.features, self.variants, self.width)
            return view.sum(dim=(1, 3)).reshape(self.members)
        return tensor.reshape(self.members, -1).sum(dim=1)

    def zero_members(self, name: str, tensor: torch.Tensor, members: torch.Tensor) -> None:
        """Set the entries of the given members (a ``(M,)`` bool mask) to zero, in place."""
        if self._shared_weight1(name):
            view = tensor.view(self.seed_count, self.features, self.variants, self.width)
            view.permute(0, 2, 1, 3)[members.view(self.seed_count, self.variants)] = 0.0
        else:
            tensor[members] = 0.0

    def broadcast(self, name: str, per_member: torch.Tensor) -> torch.Tensor:
        """Shape a ``(M,)`` tensor to broadcast against a parameter in its stored layout."""
        if self._shared_weight1(name):
            columns = per_member.view(self.seed_count, self.variants)
            return columns.repeat_interleave(self.width, dim=1).view(self.seed_count, 1, -1)
        return per_member.view(-1, *([1] * (self.params[name].dim() - 1)))

    def first_layer_input(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 images ``(S, B, 784)`` to the first Linear's input.

        Returns:
            ``(S, B, n)`` shared by each seed's runs without the front, else ``(M, B, n)``.
        """
        x = images.to(torch.float32) * (1.0 / 255.0)
        if self.conv:
            shape = (self.seed_count, self.variants, 1, 1)
            w = self.params["conv_weight"]
            b = self.params["conv_bias"].view(shape)
            x = x[:, None]  # (S, 1, B, 784)
            x = (w[:, 0].view(shape) * x[..., :-2] + w[:, 1].view(shape) * x[..., 1:-1]
                 + w[:, 2].view(shape) * x[..., 2:] + b)  # (S, V, B, 782)
            x = self.activation(x.flatten(0, 1))  # (M, B, 782)
        if self.pool:
            length = x.shape[-1] // 2 * 2
            x = x[..., :length].unflatten(-1, (length // 2, 2)).amax(dim=-1)
        return x

    def hidden_preactivation(self, first_input: torch.Tensor) -> torch.Tensor:
        """First Linear layer: returns ``(M, B, H)``."""
        bias = self.params["bias1"][:, None, :]
        if self.conv:
            return torch.baddbmm(bias, first_input, self.params["weight1"])
        batch = first_input.shape[1]
        wide = torch.bmm(first_input, self.params["weight1"])  # (S, B, V * H)
        wide = wide.view(self.seed_count, batch, self.variants, self.width).transpose(1, 2)
        return wide.reshape(self.members, batch, self.width) + bias

    def forward(self, images: torch.Tensor, dropout_uniform: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute logits ``(M, B, 10)`` and hidden pre-activations ``(M, B, H)``.

        Args:
            images: uint8 ``(S, B, 784)``, each seed's batch.
            dropout_uniform: uniform draws ``(S, B, H)``, one per seed (training only);
                a run drops a unit where its seed's draw is below its probability.
        """
        pre = self.hidden_preactivation(self.first_layer_input(images))
        hidden = self.activation(pre)
        if dropout_uniform is not None and self.uses_dropout:
            batch = pre.shape[1]
            p = self.dropout.view(self.seed_count, self.variants, 1, 1)
            keep = (dropout_uniform[:, None] >= p).to(hidden.dtype) / (1.0 - p)
            hidden = hidden * keep.view(self.members, batch, self.width)
        logits = torch.baddbmm(self.params["bias2"][:, None, :], hidden, self.params["weight2"])
        return logits, pre


def member_losses(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss over the batch for each member.

    Args:
        logits: ``(M, B, 10)``.
        labels: int64 ``(M, B)``, or ``(B,)`` shared by all members.
        loss: ``cross_entropy`` or ``mse`` (mean squared error against one-hot targets,
            averaged over batch and classes like ``nn.MSELoss``).

    Returns:
        ``(M,)`` float32.
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
        return -picked.squeeze(-1).mean(dim=1)
    if loss == "mse":
        target = F.one_hot(labels, classes).to(logits.dtype)  # (M, B, 10)
        if target.shape != logits.shape:
            raise ValueError(
                f"one-hot target of shape {tuple(target.shape)} does not match output of "
                f"shape {tuple(logits.shape)}; MSE never broadcasts a mismatch"
            )
        return (logits - target).pow(2).mean(dim=(1, 2))
    raise ValueError(f"unknown loss {loss!r}; expected cross_entropy or mse")
