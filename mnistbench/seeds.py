"""Independent random streams derived from a run's seed index.

    init_generator = generator(seed=3, stream="init")
    order = torch.randperm(60_000, generator=generator(3, "data"))

Every stream depends on the seed index and the stream name only, never on the cell.
So every cell with seed 3 sees the same batches in the same order, draws its initial
weights from the same stream (same values where shapes and distributions agree) and
the same dropout stream: cells are compared pairwise with common random numbers,
which shrinks the interval of every difference between them.
"""

from __future__ import annotations

import hashlib

import torch

STREAMS = ("init", "data", "dropout")


def stream_seed(seed: int, stream: str) -> int:
    """Return a 63-bit integer seed for one named stream of one seed index."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; expected one of {STREAMS}")
    digest = hashlib.sha256(f"mnistbench/{stream}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """Return a fresh generator for one named stream of one seed index."""
    result = torch.Generator(device=device)
    result.manual_seed(stream_seed(seed, stream))
    return result
