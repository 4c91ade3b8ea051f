"""Where a step's random numbers come from. Every micro-step draws from its own generator, a function of
(trainer.seed, micro-step) only, so a resumed run draws what the uninterrupted one did, and the ranks of a
multi-process run together draw what one process would for the global batch."""
from __future__ import annotations

import hashlib

import torch


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The generator of one micro-step's draws (VAE posterior, n, ε, ω), the same on every rank."""
    key = f"{seed}/{micro_step}/0".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


def global_randn(shape, generator: torch.Generator | None, rows: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """N(0, I) draws for the global batch (`shape[0]` rows on each of `ranks`), this rank's rows `rank::ranks`: with
    one generator state on every rank, the ranks together draw what one process with the whole batch would."""
    rank, ranks = rows
    full = torch.randn((shape[0] * ranks, *shape[1:]), generator=generator,
                       device=generator.device if generator is not None else "cpu")
    return full[rank::ranks]
