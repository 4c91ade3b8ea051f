"""Sampling a teacher (DDIM / DPM-Solver++) with the diffusers pipeline from given initial noise, in the LCM
convention for guidance (a pipeline's `guidance_scale` is w + 1), and image grids.

Used to measure the tiny teacher (`lcm-exp-build-teacher`) and in tests; a distilled student is measured by
the per-run evaluation, `lcm_exp/evaluation.py`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def initial_noise(teacher, n: int, seed: int, resolution: int) -> torch.Tensor:
    """Initial latents z_T ~ N(0, I) for `n` samples, the same for every sampler given `seed`."""
    f = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    shape = (n, teacher.unet.config.in_channels, resolution // f, resolution // f)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_teacher(teacher, prompts: list[str], w: float, steps: int, latents: torch.Tensor,
                   solver: str = "ddim", batch: int = 64) -> torch.Tensor:
    """The teacher's samples (B, 3, H, W) in [-1, 1] with `solver` at `steps` steps and guidance w."""
    from .pipelines import pipeline_parts

    parts, teacher_cls, _ = pipeline_parts(teacher)
    pipe = teacher_cls(unet=teacher.unet, scheduler=teacher.solver_scheduler(solver), **parts)
    pipe.set_progress_bar_config(disable=True)
    res = latents.shape[-1] * pipe.vae_scale_factor
    out = []
    for i in range(0, len(prompts), batch):
        out.append(pipe(list(prompts[i:i + batch]), height=res, width=res, num_inference_steps=steps,
                        guidance_scale=w + 1.0, latents=latents[i:i + batch].clone(), output_type="pt").images)
    return torch.cat(out) * 2 - 1


def grid(images: torch.Tensor, ncol: int | None = None, scale: int = 2) -> Image.Image:
    """Images in [-1, 1] as one PIL grid (1 px gaps), upscaled `scale` times."""
    n = len(images)
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    h, w = arr.shape[1:3]
    canvas = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, 3), 255, np.uint8)
    for i, a in enumerate(arr):
        r, c = divmod(i, ncol)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = a
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)
