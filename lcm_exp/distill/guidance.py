"""The guidance scale w: sampled per example in training, embedded as the student's `timestep_cond`.

LCM formulation (LCM paper eq. 6): x0 = x0_c + w (x0_c - x0_u); a diffusers
pipeline's `guidance_scale` is w + 1.
"""
from __future__ import annotations

import math

import torch


def guidance_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of w·1000 (VDM), the one `LatentConsistencyModelPipeline` feeds the UNet."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = (w.to(dtype) * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class UniformGuidance:
    """w ~ U[w_min, w_max], one value per example.

    The interface of a guidance sampler (`conf/guidance/`): `sample(n, device, generator) -> w` (one value per
    example, drawn from `generator` only) and `mid`, the w at which validation and evaluation sample."""

    def __init__(self, w_min: float, w_max: float):
        from ..config import invalid

        if w_min > w_max:
            raise invalid("guidance.w_min", f"{float(w_min)} > guidance.w_max={float(w_max)}", "w_min <= w_max")
        if w_min < 0:
            raise invalid("guidance.w_min", w_min, ">= 0 (w=0 is the conditional model)")
        self.w_min, self.w_max = float(w_min), float(w_max)

    def sample(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None):
        u = torch.rand(n, generator=generator, device="cpu" if generator is None else generator.device)
        return (self.w_min + (self.w_max - self.w_min) * u).to(device)

    @property
    def mid(self) -> float:
        return 0.5 * (self.w_min + self.w_max)
