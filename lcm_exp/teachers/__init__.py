"""Teachers: a pretrained latent diffusion model in the diffusers folder layout, loaded one way for all.

Every teacher option of `conf/teacher/` ends in `load_teacher(path, ...)`, the
same `from_pretrained(path, subfolder=...)` path Stable Diffusion takes; tiny
teachers are first built into a cache folder in that same layout.
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ..config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """The frozen parts of a latent diffusion model and the two things LCD asks of them."""

    name: str
    path: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    cast_to_mixed_precision: bool = True
    revision: str | None = None  # where `path` was loaded from, to load fp32 components again (the export)
    variant: str | None = None
    # the unconditional embeddings depend on the batch (SDXL: its micro-conditioning sizes), so not cached once
    per_sample_uncond = False

    @property
    def schedule(self):
        """The noise schedule the LCD step, methods and solvers use (`lcm_exp.distill.schedules`)."""
        from ..distill.schedules import VPSchedule

        return VPSchedule(self.scheduler.alphas_cumprod, self.prediction_type)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    # ---------------------------------------------------------------------------------------------- sampling
    # A teacher family with another noise schedule returns its own samplers here (diffusers schedulers: the
    # pipelines call set_timesteps, scale_model_input, step and init_noise_sigma); nothing else samples.
    solvers = ("ddim", "dpmpp")  # the teacher's own samplers the evaluation compares the student with

    def consistency_scheduler(self, num_steps: int, timestep_scaling: float):
        """The sampler of a student of this teacher (validation, evaluation, the export): LCM's multistep
        consistency sampler, `LCMScheduler`, on the training's skip-step grid (`num_steps` = N = T // k) with the
        student's boundary scalings."""
        from diffusers import LCMScheduler

        # clip_sample=False: LCM's own setting (clipping latents to [-1, 1] is wrong; a DDPM config read from SD
        # 1.5's PNDM config would carry DDPM's default True). Keys LCMScheduler does not take (DDPM's variance_type)
        # are left out, so that loading the saved scheduler does not warn about them.
        accepted = inspect.signature(LCMScheduler.__init__).parameters
        config = {k: v for k, v in self.scheduler.config.items() if k in accepted}
        return LCMScheduler.from_config(config, original_inference_steps=num_steps,
                                        timestep_scaling=timestep_scaling, clip_sample=False)

    def solver_scheduler(self, solver: str, **settings):
        """The teacher's own sampler `solver` (one of `solvers`: DDIM, DPM-Solver++) with diffusers `settings`
        (e.g. timestep_spacing)."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        if solver == "dpmpp":
            return DPMSolverMultistepScheduler.from_config(self.scheduler.config, algorithm_type="dpmsolver++",
                                                           **settings)
        if solver == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config, **settings)
        raise ValueError(f"teacher {self.name} has no sampler {solver!r} (it has: {', '.join(self.solvers)})")

    def frozen_modules(self):
        return [self.unet, self.vae, self.text_encoder]

    def to(self, device, dtype=None):
        cast = dtype is not None and dtype != torch.float32 and self.cast_to_mixed_precision
        for m in (self.unet, self.text_encoder):
            torch.nn.Module.to(m, device, dtype) if cast else m.to(device)  # (diffusers' `to` warns needlessly)
        self.vae.to(device)  # the VAE stays fp32: SD's VAE overflows in fp16
        return self

    def fp32(self, sub: str) -> torch.nn.Module:
        """Component `sub` (e.g. "text_encoder") with its weights as loaded: itself when it is fp32, else loaded
        again from `path` (training may have cast it to bf16/fp16, which rounds the weights for good)."""
        module = getattr(self, sub)
        if module.dtype == torch.float32:
            return module
        if not self.path.startswith("<"):
            return type(module).from_pretrained(self.path, subfolder=sub, revision=self.revision,
                                                variant=self.variant).requires_grad_(False).eval()
        log.warning("teacher %s is in memory: its %s is exported from its %s copy", self.name, sub, module.dtype)
        return copy.deepcopy(module).float()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) → latents z = E(x)·scaling_factor (LCM paper §4.1), the posterior sampled
        with `generator` (torch's default generator without one)."""
        latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.sample(generator=generator)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return images.clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str], micro_conditioning: list | None = None) -> dict:
        """Captions → the UNet's conditioning keyword arguments (`micro_conditioning`: SDXL only)."""
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        hidden = self.text_encoder(ids.to(self.text_encoder.device))[0]
        return {"encoder_hidden_states": hidden}

    def condition(self, batch: dict, draws, device) -> tuple:
        """Step 1 of Alg. 1: (z = E(x)·scale, the caption conditions, the empty prompt's), on `device`; from the
        VAE posterior and the text embeddings a precomputed batch (`data=cached`) holds, or by encoding. The
        posterior's noise is each row's own (`draws`: `lcm_exp.distill.draws.Draws`)."""
        micro = batch.get("micro_conditioning")  # SDXL: per-sample original size and crop coordinates
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            cond = {"encoder_hidden_states": batch["encoder_hidden_states"].to(device)}
        else:
            with torch.no_grad():
                posterior = self.vae.encode(batch["pixels"].to(device, self.vae.dtype)).latent_dist
            mean, std = posterior.mean, posterior.std
            cond = self.encode_prompts(batch["captions"], micro)
        noise = draws.randn(mean.shape[1:], device, mean.dtype)
        latents = (mean + std * noise).float() * self.vae.config.scaling_factor
        n, uncond = latents.shape[0], getattr(self, "_uncond", None)
        stale = uncond is None or next(iter(uncond.values())).shape[0] != n
        if stale or (micro is not None and self.per_sample_uncond):
            uncond = self._uncond = self.encode_prompts([""] * n, micro)  # else once: "" never changes
        return latents, cond, uncond


def _check_folder(pretrained: str, components: list[str]) -> None:
    """A local teacher folder must hold every component: a missing one is named (instead of a loader's error)."""
    p = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or p.exists()
    if not looks_local:
        return  # a hub id
    if not p.is_dir():
        raise ConfigError(f"teacher.pretrained={pretrained!r}: no such folder. Give a diffusers pipeline folder "
                          "(as `save_pretrained` writes it), or a hub id when online.")
    missing = [c for c in components if not (p / c).is_dir()]
    if missing:
        raise ConfigError(
            f"teacher.pretrained={pretrained!r} is not a complete diffusers pipeline folder: {', '.join(missing)} "
            f"missing (it needs {', '.join(components)}). Point it at the folder `save_pretrained` wrote, or a hub "
            "id such as stable-diffusion-v1-5/stable-diffusion-v1-5 when online.")


def load_components(name: str, pretrained: str | None, revision: str | None = None, variant: str | None = None,
                    vae: str | None = None, text_encoders: dict | None = None) -> dict:
    """unet, vae, scheduler and each `text_encoders` subfolder (with its tokenizer, `tokenizer<suffix>`) from a
    diffusers folder or hub id, frozen; a missing or wrong folder is a ConfigError that says what to do."""
    if not pretrained:
        raise ConfigError(f"teacher={name} needs teacher.pretrained=<diffusers folder or hub id>")
    encoders = text_encoders or {"text_encoder": CLIPTextModel}
    _check_folder(pretrained, ["unet", "scheduler"] + (["vae"] if not vae else []) +
                  [c for sub in encoders for c in (sub, sub.replace("text_encoder", "tokenizer"))])
    kw = dict(revision=revision, variant=variant)
    try:
        out = {"unet": UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kw),
               "vae": (AutoencoderKL.from_pretrained(vae, revision=revision) if vae
                       else AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **kw)),
               "scheduler": DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision)}
        for sub, cls in encoders.items():
            out[sub] = cls.from_pretrained(pretrained, subfolder=sub, **kw)
            tok = sub.replace("text_encoder", "tokenizer")
            out[tok] = CLIPTokenizer.from_pretrained(pretrained, subfolder=tok, revision=revision)
    except OSError as e:
        raise ConfigError(
            f"Could not load teacher {name!r} from {pretrained!r}: {e}\nOffline, point teacher.pretrained at a "
            "local diffusers folder; online, check the hub id and teacher.revision.") from e
    for m in out.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
    return out


def load_teacher(name: str, pretrained: str | None, revision: str | None, variant: str | None, vae: str | None,
                 cast_to_mixed_precision: bool) -> Teacher:
    """Loads an SD-1.x/2.x-shaped teacher from a local folder or hub id (`conf/teacher/sd15.yaml`, `sd21.yaml`;
    the tiny teachers end here too). `cast_to_mixed_precision`: the frozen UNet and text encoder run in the
    training's bf16/fp16; `vae`: another VAE's folder or hub id."""
    c = load_components(name, pretrained, revision, variant, vae)
    return Teacher(name=name, path=str(pretrained), cast_to_mixed_precision=cast_to_mixed_precision,
                   revision=revision, variant=variant, **c)
