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
``(S, batch, n) @ (S, n, V * width)``. With the front (:mod:`mnistbench.front`) every
run has its own input and the first layer is ``(M, batch, n) @ (M, n, width)``.

The first Linear's inputs and rows follow the block's order, most often nonzero first:
the features without the front (:mod:`mnistbench.features`), or the front's windows
(:mod:`mnistbench.windows`). On the CPU the engine sorts each batch by where its
examples' zeros start. A training step then multiplies the first layer in
:class:`~mnistbench.features.Band` pieces that leave out the known zeros, and with the
front computes the front only inside them too.

    block = Block(members_settings, seeds=[0, 1], device="cpu")
    trace = block.forward(block.inputs(images_uint8))   # trace.logits (M, batch, 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mnistbench import native
from mnistbench.activations import ACTIVATIONS
from mnistbench.features import Band, arrange_features
from mnistbench.initialization import init_member
from mnistbench.matrix import Settings
from mnistbench.front import front_constant, run_front
from mnistbench.windows import Packing, WindowLayout, arrange_windows, first_layer


# Settings that must agree for runs to train in one stack; the others (init, lr,
# momentum, weight_decay, dropout) may vary per member.
STRUCTURE_FIELDS = ("activation", "conv", "pool", "width", "loss", "optimizer", "batch_size",
                    "epochs", "train_subset", "precision")


def structure_of(settings: Settings) -> tuple:
    """Return the part of the settings that decides whether runs can share a stack."""
    return tuple(getattr(settings, name) for name in STRUCTURE_FIELDS)


@dataclass
class Trace:
    """Tensors that a forward pass keeps for the backward pass, for ``M`` runs and batch ``B``.

    With the front, ``L`` is the :func:`~mnistbench.windows.packed_width` of its
    packings.

    - ``rows``: the convolution's packed inputs, (S, pixels + 1, L), or with the
      compiled kernels (:mod:`mnistbench.native`) the batch's uint8 windows,
      (S, B, pixels * count). None without the front.
    - ``front_in``: the front's pre-activation, (M, outputs, L), kept only when the
      activation's derivative needs it.
    - ``front_out``: the front's activated output, (M, L), or (M, 2, L) when pooled
      after the activation.
    - ``pool_gap``: (M, L), each pair's odd value minus its even value, when pooled
      (None where the compiled kernels compute the pairs again in the backward pass).
    - ``first_input``: the first Linear's input, (S, B, n) shared by a seed's runs, or
      packed (M, L) with the front.
    - ``bands``: per seed, the :class:`~mnistbench.features.Band` pieces that the first
      Linear multiplied, or None when it multiplied everything.
    - ``packings``: with the front, per seed, the :class:`~mnistbench.windows.Packing`
      of its windows (one whole band without ``bands``).
    - ``tails``: with the front and ``bands``, the sums of each run's weight rows past
      each band's stop, ``(M, bands, H)``.
    - ``pre``: (M, B, H) hidden pre-activation, kept only when needed.
    - ``hidden``, ``keep``, ``dropped``: its activation, the dropout scale (or None),
      and the hidden units after dropout.
    - ``logits``: (M, B, 10).
    """

    rows: torch.Tensor | None
    front_in: torch.Tensor | None
    front_out: torch.Tensor | None
    pool_gap: torch.Tensor | None
    first_input: torch.Tensor
    bands: list[tuple[Band, ...]] | None
    packings: list[Packing] | None
    tails: torch.Tensor | None
    pre: torch.Tensor | None
    hidden: torch.Tensor
    keep: torch.Tensor | None
    dropped: torch.Tensor
    logits: torch.Tensor


class Block:
    """Parameters and forward pass of ``S`` seeds x ``V`` runs that share a structure.

    Member ``m = s * V + v`` is run ``v`` of seed ``seeds[s]``. Every seed has the same
    number of runs, so all seeds train in the same batched matmuls: the per-operation
    cost of the Python loop is paid once per step, not once per seed.

    ``feature_order`` orders the first Linear's inputs: the features without the front
    (:func:`~mnistbench.features.feature_order`), or the front's windows
    (:func:`~mnistbench.windows.window_order`). None keeps pixel order.
    """

    def __init__(self, settings: Sequence[Settings], seeds: Sequence[int],
                 device: torch.device | str, feature_order: torch.Tensor | None = None) -> None:
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
        # bf16 matmuls on CUDA. tf32 is a global CUDA switch, which the engine sets.
        # NOTE: neither precision has run on a GPU yet.
        self.matmul_dtype = (torch.bfloat16 if first.precision == "bf16"
                             and self.device.type == "cuda" else None)
        self.layout = WindowLayout.of(self.pool) if self.conv else None
        drawn = [init_member(s, self.seeds[m // self.variants])
                 for m, s in enumerate(self.settings)]
        self.feature_order = None
        if feature_order is not None:
            self.feature_order = feature_order.to(self.device)
            for d in drawn:
                d["weight1"] = d["weight1"][feature_order.cpu()]
        # Skipping known zeros needs each batch's bands on the host, so a GPU would wait
        # for them every step. Its matmuls are wide enough to multiply everything.
        self.skips_zeros = self.device.type == "cpu"
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
            self.params[name] = tensor.contiguous().to(self.device)
        self.dropout = torch.tensor([s.dropout for s in self.settings], device=self.device)
        self.uses_dropout = bool((self.dropout > 0).any())

    @property
    def fuses_hidden(self) -> bool:
        """Whether the compiled kernels also add the hidden layer's bias, activate it and
        apply dropout, in one pass where torch took four: with the front on the CPU."""
        return (self.conv and self.settings[0].activation in native.ACTIVATIONS
                and native.runs_on(self.device))

    @property
    def shared_weight1(self) -> bool:
        """Whether ``weight1`` is stored as one ``(S, n, V * H)`` slice per seed."""
        return not self.conv

    def member_weights(self, m: int, tensors: dict[str, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor]:
        """Return member ``m``'s slice of parameter-shaped tensors, in :func:`init_member`'s
        shapes and order; ``tensors`` defaults to the parameters themselves."""
        tensors = self.params if tensors is None else tensors
        sliced = {name: tensor[m] for name, tensor in tensors.items() if name != "weight1"}
        weight1 = tensors["weight1"]
        if self.shared_weight1:
            s, v = divmod(m, self.variants)
            sliced["weight1"] = weight1[s, :, v * self.width:(v + 1) * self.width]
        else:
            sliced["weight1"] = weight1[m]
        if self.feature_order is not None:
            sliced["weight1"] = sliced["weight1"][torch.argsort(self.feature_order)]
        return sliced

    def member_sums(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a parameter-shaped tensor over everything but the member: ``(M,)``.

        Each member's values are summed as one contiguous row, so a sum does not
        depend on how many runs share the stack.
        """
        if name == "weight1" and self.shared_weight1:
            view = tensor.view(self.seed_count, self.features, self.variants, self.width)
            return view.transpose(1, 2).reshape(self.members, -1).sum(dim=1)
        return tensor.reshape(self.members, -1).sum(dim=1)

    def zero_members(self, name: str, tensor: torch.Tensor, members: torch.Tensor) -> None:
        """Set the entries of the given members (a ``(M,)`` bool mask) to zero, in place."""
        if name == "weight1" and self.shared_weight1:
            view = tensor.view(self.seed_count, self.features, self.variants, self.width)
            view.masked_fill_(members.view(self.seed_count, 1, self.variants, 1), 0.0)
        else:
            tensor.masked_fill_(members.view(-1, *([1] * (tensor.dim() - 1))), 0.0)

    def broadcast(self, name: str, per_member: torch.Tensor) -> torch.Tensor:
        """Shape a ``(M,)`` tensor to broadcast against a parameter in its stored layout."""
        if name == "weight1" and self.shared_weight1:
            columns = per_member.view(self.seed_count, self.variants)
            return columns.repeat_interleave(self.width, dim=1).view(self.seed_count, 1, -1)
        return per_member.view(-1, *([1] * (self.params[name].dim() - 1)))

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Batched matmul in the block's precision, returned as float32."""
        if self.matmul_dtype is None:
            return torch.bmm(a, b)
        return torch.bmm(a.to(self.matmul_dtype), b.to(self.matmul_dtype)).float()

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Arrange uint8 images ``(..., 784)`` as :meth:`forward` takes them, in the
        block's order: the front's windows (:func:`~mnistbench.windows.arrange_windows`),
        or without the front the features of
        :func:`~mnistbench.features.arrange_features`."""
        if self.conv:
            return arrange_windows(images, self.layout, self.feature_order)
        return arrange_features(images, self.pool, self.feature_order)

    def forward(self, images: torch.Tensor, dropout_uniform: torch.Tensor | None = None,
                *, bands: list[tuple[Band, ...]] | None = None,
                for_backward: bool = True) -> Trace:
        """Run the stacked model on each seed's batch and keep what backward needs.

        Args:
            images: uint8 ``(S, B, ...)``, each seed's batch, arranged by :meth:`inputs`.
            dropout_uniform: uniform draws ``(S, B, H)``, one per seed (training only);
                a run drops a unit where its seed's draw is below its probability.
            bands: per seed, the
                :func:`~mnistbench.features.zero_skipping_bands` of its batch, whose
                examples must be in ascending order of extent. None multiplies
                everything.
            for_backward: whether :func:`~mnistbench.backprop.gradients` will use the
                trace; evaluation skips what only the backward pass needs.
        """
        seeds, batch = images.shape[:2]
        act = self.activation
        rows = front_in = front_out = gap = packings = tails = None
        if self.conv:
            rows, front_in, front_out, gap, x, packings = run_front(self, images, bands,
                                                                    for_backward)
        elif images.stride(0) == 0:  # one batch for every seed, as in evaluation
            # uint8 times a float is float32: one pass, where a conversion and a
            # scaling took two.
            x = torch.mul(images[0], 1.0 / 255.0).expand(images.shape)
        else:
            x = torch.mul(images, 1.0 / 255.0)
        uniform = dropout_uniform if self.uses_dropout else None
        if packings is not None and bands is not None:
            pre, tails = first_layer(x, self.params["weight1"], front_constant(self),
                                     packings)
            if self.fuses_hidden:
                hidden, keep, dropped = native.hidden_forward(
                    pre, self.params["bias1"], self.settings[0].activation, uniform,
                    self.dropout)
                return Trace(rows, front_in, front_out, gap, x, bands, packings, tails,
                             None, hidden, keep, dropped, self._logits(dropped))
            pre.add_(self.params["bias1"][:, None, :])
        elif packings is not None:  # one whole band: the plain (M, B, n) layout
            plain = x[:, :batch * self.features].view(self.members, batch, -1)
            pre = self._hidden_preactivation(plain, None)
        else:
            pre = self._hidden_preactivation(x, bands)
        hidden = act.forward_(pre)  # in place, unless the derivative needs the input
        keep = None
        if uniform is not None:
            p = self.dropout.view(seeds, self.variants, 1, 1)
            keep = torch.empty(seeds, self.variants, batch, self.width, device=self.device)
            # Comparing straight into float32 is one pass; a bool mask and a
            # broadcast division took 25 times longer.
            torch.ge(uniform[:, None], p, out=keep).mul_(1.0 / (1.0 - p))
            keep = keep.view(self.members, batch, self.width)
        dropped = hidden if keep is None else hidden * keep
        return Trace(rows, front_in, front_out, gap, x, bands, packings, tails,
                     pre if act.needs_input else None, hidden, keep, dropped,
                     self._logits(dropped))

    def _logits(self, dropped: torch.Tensor) -> torch.Tensor:
        """Compute the output layer's logits ``(M, B, 10)`` from the hidden units after
        dropout."""
        # (W2^T @ h^T)^T: with 10 output rows the matmul runs about 3x faster than h @ W2.
        logits = self.matmul(self.params["weight2"].transpose(1, 2), dropped.transpose(1, 2))
        return logits.transpose(1, 2).add_(self.params["bias2"][:, None])

    def _hidden_preactivation(self, first_input: torch.Tensor,
                              bands: list[tuple[Band, ...]] | None) -> torch.Tensor:
        """First Linear layer: returns ``(M, B, H)``."""
        bias, weight = self.params["bias1"], self.params["weight1"]
        if self.conv:
            return self.matmul(first_input, weight).add_(bias[:, None, :])
        batch = first_input.shape[1]
        if bands is None:
            wide = self.matmul(first_input, weight)  # (S, B, V * H)
        else:
            wide = torch.empty(self.seed_count, batch, weight.shape[2], device=self.device)
            for s, seed_bands in enumerate(bands):
                x, w, out = first_input[s], weight[s], wide[s]
                whole, *rest = seed_bands
                torch.mm(x[:, :whole.stop], w[:whole.stop], out=out)
                for first, start, stop in rest:
                    out[first:].addmm_(x[first:, start:stop], w[start:stop])
        wide = wide.view(self.seed_count, batch, self.variants, self.width).transpose(1, 2)
        out = torch.empty(self.seed_count, self.variants, batch, self.width, device=self.device)
        torch.add(wide, bias.view(self.seed_count, self.variants, 1, self.width), out=out)
        return out.view(self.members, batch, self.width)
