"""Tiny, randomly initialised pipelines in the real SD 1.5, SD 2.1 (v-prediction) and SDXL folder layouts
and scheduler configs, for tests and offline smoke runs of `teacher=sd15|sd21|sdxl teacher.pretrained=DIR`.

    python -m lcm_exp.teachers.tiny_layouts sd15 /tmp/tiny-sd15

The VAE makes 8×8 latents from 32 px images (three levels, factor 4; SD's has four, factor 8).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tiny_random import WORDS
from .tokenizer import build_clip_tokenizer

# The scheduler configs of the real checkpoints (their scheduler/scheduler_config.json).
SCHEDULERS = {
    "sd15": (PNDMScheduler, dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)),
    "sd21": (DDIMScheduler, dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")),
    "sdxl": (EulerDiscreteScheduler, dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          num_train_timesteps=1000, interpolation_type="linear", prediction_type="epsilon",
                                          steps_offset=1, timestep_spacing="leading", use_karras_sigmas=False)),
}


def _text_encoder(tokenizer, hidden: int, cls=CLIPTextModel, projection_dim: int = 32):
    return cls(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              projection_dim=projection_dim, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id))


def _vae():
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16],
                         down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                         norm_num_groups=8, sample_size=32)


def build(layout: str, path: str | Path, seed: int = 0) -> Path:
    """Writes a tiny `layout` (sd15 | sd21 | sdxl) pipeline into `path` with `save_pretrained`; returns `path`."""
    torch.manual_seed(seed)
    cls, sched_cfg = SCHEDULERS[layout]
    scheduler = cls(**sched_cfg)
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=32)
    common = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], norm_num_groups=8)
    if layout == "sdxl":
        unet = UNet2DConditionModel(**common, cross_attention_dim=64, attention_head_dim=[2, 4],
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=[1, 2],
                                    projection_class_embeddings_input_dim=32 + 6 * 8)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_text_encoder(tokenizer, 32), tokenizer=tokenizer,
            text_encoder_2=_text_encoder(tokenizer, 32, CLIPTextModelWithProjection, projection_dim=32),
            tokenizer_2=build_clip_tokenizer(WORDS, model_max_length=32), unet=unet, scheduler=scheduler)
    else:
        sd21 = layout == "sd21"
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=[2, 4] if sd21 else 8,
                                    use_linear_projection=sd21)
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(tokenizer, 32), tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    if layout == "sd15":  # SD 1.5's scheduler_config.json also states clip_sample (PNDM ignores it)
        f = path / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "clip_sample": False}, indent=2))
    return path


if __name__ == "__main__":
    print(build(sys.argv[1], sys.argv[2]))
