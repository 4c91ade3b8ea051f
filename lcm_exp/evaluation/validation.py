"""Validation image grids: the online student and the target (EMA) sampled with diffusers'
`LatentConsistencyModelPipeline` and the teacher's consistency sampler (`LCMScheduler` for SD-family teachers)
at a few step counts, fixed prompts and seed.

One PNG per model and validation step (rows: step counts, columns: prompts, captioned; `grids.py`), written
under the job's output folder and logged as run artifacts `validation/step_<N>/<model>.png`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from ..teachers.pipelines import student_pipeline
from .grids import captioned_grid, steps_label

log = logging.getLogger(__name__)

PROMPTS = ("a large red circle in the center on a white background",
           "a small blue square in the top left on a black background",
           "a large green triangle on the right on a gray background",
           "a small yellow cross at the bottom on a purple background")


class Validator:
    def __init__(self, teacher, student, target_unet, sampling, resolution: int, out_dir: str | Path,
                 tracker=None, steps=(1, 2, 4), prompts=(), seed: int = 0, w: float = 7.0, unwrap=lambda m: m,
                 dtype: torch.dtype = torch.float32):
        """`student`: the student kind (its online network and guidance scale); `sampling`: how the method's
        students sample (`lcm_exp.distill.methods.Sampling`)."""
        self.teacher, self.student, self.unwrap = teacher, student, unwrap
        self.student_unet, self.target_unet = student.unet, target_unet
        self.dtype = dtype  # the training's mixed-precision dtype: the UNet and text encoder run under its autocast
        self.resolution, self.out_dir, self.tracker = int(resolution), Path(out_dir), tracker
        self.steps, self.prompts = [int(s) for s in steps] or [1, 2, 4], list(prompts) or list(PROMPTS)
        self.seed, self.w = int(seed), float(w)
        self.sampling = sampling
        self.last_step: int | None = None

    @torch.no_grad()
    def grid(self, unet, title: str = "") -> Image.Image:
        unet = self.unwrap(unet)
        was_training = unet.training
        unet.eval()
        try:
            pipe = student_pipeline(self.teacher, unet, self.sampling.scheduler, plain=self.sampling.plain)
            rows = []
            for n in self.steps:
                gen = torch.Generator("cpu").manual_seed(self.seed)
                latents = torch.randn((len(self.prompts), unet.config.in_channels, self.resolution // pipe.vae_scale_factor,
                                       self.resolution // pipe.vae_scale_factor), generator=gen)
                # (the generator also draws the LCM sampler's noise between steps: validation never touches
                # torch's global RNG, so a resumed run draws what the uninterrupted one did)
                with mixed_precision(unet.device, self.dtype):
                    out = pipe(self.prompts, height=self.resolution, width=self.resolution, num_inference_steps=n,
                               guidance_scale=self.student.guidance_scale(self.w), generator=gen,
                               latents=latents.to(unet.device, self.teacher.text_encoder.dtype), output_type="latent",
                               **self.sampling.kwargs(n))
                pixels = (self.teacher.decode_latents(out.images.float()).float().cpu() + 1) / 2  # fp32 VAE
                rows.append((n, to_pil(pixels)))
        finally:
            unet.train(was_training)
        return make_grid(rows, self.prompts, title)

    def __call__(self, step: int, online=None, target=None) -> list[Path]:
        """Writes and logs the grids of the online student and the target at training step `step` (`online`,
        `target`: plain copies of sharded networks, `Trainer.networks`)."""
        if self.last_step == step:
            return []
        self.last_step = step
        folder = self.out_dir / "validation" / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, unet in (("student", online or self.student_unet), ("target", target or self.target_unet)):
            path = folder / f"{name}.png"
            what = "online student" if name == "student" else "target (EMA) student"
            self.grid(unet, f"{what} at training step {step}, w = {self.w:g}").save(path)
            paths.append(path)
            if self.tracker is not None:
                self.tracker.log_artifact(path, f"validation/step_{step:06d}")
        log.info("validation grids at step %d: %s", step, folder)
        return paths


def mixed_precision(device: torch.device, dtype: torch.dtype):
    """Autocast to the training's low-precision dtype (the frozen text encoder runs in it, the student's weights
    are fp32); nothing under fp32 training."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images."""
    arr = (pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def make_grid(rows: list[tuple[int, list[Image.Image]]], prompts: list[str], title: str = "") -> Image.Image:
    """One row per step count ("1 step", "4 steps"), one column per prompt (its text above it)."""
    return captioned_grid([images for _, images in rows], [steps_label(n) for n, _ in rows], prompts, title)
