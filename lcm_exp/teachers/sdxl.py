"""`teacher=sdxl`: Stable Diffusion XL, loaded from a diffusers folder or hub id like the SD teachers.

What differs from SD 1/2: two text encoders (CLIPTextModel + CLIPTextModelWithProjection) whose penultimate
hidden states are concatenated, the second one's pooled projection, and the micro-conditioning time_ids
(original size, crop top-left, target size; Podell et al. 2023 §2.2), as `StableDiffusionXLPipeline` builds them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..config import ConfigError
from . import Teacher, _check_folder


@dataclass
class SDXLTeacher(Teacher):
    text_encoder_2: CLIPTextModelWithProjection = None
    tokenizer_2: CLIPTokenizer = None
    resolution: int = 1024  # original and target size when the data gives none
    force_zeros_for_empty_prompt: bool = True  # the uncond ("" caption) embeddings are zeros, as in the pipeline

    def frozen_modules(self):
        return [*super().frozen_modules(), self.text_encoder_2]

    def to(self, device, dtype=None):
        super().to(device, dtype)
        cast = dtype is not None and dtype != torch.float32 and self.cast_to_mixed_precision
        self.text_encoder_2.to(device, dtype) if cast else self.text_encoder_2.to(device)
        return self

    def time_ids(self, n: int, micro_conditioning: list | None = None) -> torch.Tensor:
        """(n, 6): original (h, w), crop (top, left), target (h, w); from the data when it gives them
        (`micro_conditioning`: per sample (orig_h, orig_w, crop_top, crop_left)), else the resolution and 0 crops."""
        r = self.resolution
        rows = [list(m) + [r, r] for m in micro_conditioning] if micro_conditioning else [[r, r, 0, 0, r, r]] * n
        return torch.tensor(rows, dtype=torch.float32, device=self.unet.device)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str], micro_conditioning: list | None = None) -> dict:
        captions = list(captions)
        hidden, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's pooled projection (text_embeds)
        hidden = torch.cat(hidden, dim=-1)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([c == "" for c in captions], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        time_ids = self.time_ids(len(captions), micro_conditioning).to(hidden.dtype)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def load(name: str, pretrained: str | None, revision: str | None = None, variant: str | None = None,
         vae: str | None = None, cast_to_mixed_precision: bool = True, resolution: int | None = None,
         force_zeros_for_empty_prompt: bool | None = None, **_: object) -> SDXLTeacher:
    """Loads an SDXL-shaped teacher (unet, vae, text_encoder(_2), tokenizer(_2), scheduler)."""
    if not pretrained:
        raise ConfigError(f"teacher={name} needs teacher.pretrained=<diffusers folder or hub id>")
    _check_folder(pretrained)
    kw = dict(revision=revision, variant=variant)
    try:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kw)
        vae_model = (AutoencoderKL.from_pretrained(vae, revision=revision) if vae
                     else AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **kw))
        te1 = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **kw)
        te2 = CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2", **kw)
        tok1 = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision)
        tok2 = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", revision=revision)
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision)
    except OSError as e:
        raise ConfigError(f"Could not load SDXL teacher {name!r} from {pretrained!r}: {e}\nOffline, point "
                          "teacher.pretrained at a local diffusers folder.") from e
    if unet.config.addition_embed_type != "text_time":
        raise ConfigError(f"teacher={name}: {pretrained} is not SDXL-shaped (its UNet has no text_time "
                          "micro-conditioning); use teacher=sd15 or sd21")
    if force_zeros_for_empty_prompt is None:
        index = Path(pretrained) / "model_index.json"
        force_zeros_for_empty_prompt = (json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)
                                        if index.exists() else True)
    for m in (unet, vae_model, te1, te2):
        m.requires_grad_(False).eval()
    return SDXLTeacher(name=name, path=str(pretrained), unet=unet, vae=vae_model, text_encoder=te1, tokenizer=tok1,
                       scheduler=scheduler, cast_to_mixed_precision=cast_to_mixed_precision, text_encoder_2=te2,
                       tokenizer_2=tok2, resolution=int(resolution or unet.config.sample_size * 8),
                       force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))
