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
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..config import ConfigError
from . import Teacher, load_components


@dataclass
class SDXLTeacher(Teacher):
    text_encoder_2: CLIPTextModelWithProjection = None
    tokenizer_2: CLIPTokenizer = None
    per_sample_uncond = True  # the uncond time_ids carry each batch's original sizes and crops
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


def load(name: str, pretrained: str | None, revision: str | None, variant: str | None, vae: str | None,
         cast_to_mixed_precision: bool, resolution: int | None, force_zeros_for_empty_prompt: bool | None) -> SDXLTeacher:
    """Loads an SDXL-shaped teacher (unet, vae, text_encoder(_2), tokenizer(_2), scheduler)."""
    c = load_components(name, pretrained, revision, variant, vae,
                        {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection})
    unet = c["unet"]
    if unet.config.addition_embed_type != "text_time":
        raise ConfigError(f"teacher={name}: {pretrained} is not SDXL-shaped (its UNet has no text_time "
                          "micro-conditioning); use teacher=sd15 or sd21")
    if force_zeros_for_empty_prompt is None:
        index = Path(pretrained) / "model_index.json"
        force_zeros_for_empty_prompt = (json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)
                                        if index.exists() else True)
    return SDXLTeacher(name=name, path=str(pretrained), cast_to_mixed_precision=cast_to_mixed_precision, **c,
                       revision=revision, variant=variant,
                       resolution=int(resolution or unet.config.sample_size * 8),
                       force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))
