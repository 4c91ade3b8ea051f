"""Where a step's random numbers come from: every sample of the global batch has its own generator, seeded by
(trainer.seed, micro-step, its row in the global batch), and draws its numbers in one fixed order (the VAE
posterior's noise, the timestep pair, ε, ω). So a resumed run draws what the uninterrupted one did, any number
of ranks draws what one process would (rank r holds rows r::W and seeds only those), on any world size, and a
rank's cost is its own rows', whatever the number of ranks."""
from __future__ import annotations

import hashlib
from typing import Callable

import torch


def row_seed(seed: int, micro_step: int, row: int) -> int:
    key = f"{seed}/{micro_step}/{row}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class Draws:
    """The generators of this rank's rows of one micro-step (`rows`: their indices in the global batch)."""

    def __init__(self, seed: int, micro_step: int, rows):
        self.rows = list(rows)
        self.generators = [torch.Generator().manual_seed(row_seed(seed, micro_step, r)) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def randn(self, shape, device=None, dtype=None) -> torch.Tensor:
        """N(0, I) of `shape` per row, stacked: (rows, *shape)."""
        out = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
        return out.to(device=device, dtype=dtype) if device is not None or dtype is not None else out

    def each(self, draw: Callable[[torch.Generator], object]):
        """`draw(generator)` once per row, each result holding one row (a tensor, or a tuple of tensors),
        concatenated along the batch: a sampler written as `sample(n, device, generator)` is called with n = 1."""
        parts = [draw(g) for g in self.generators]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(p) for p in zip(*parts))
        return torch.cat(parts)
