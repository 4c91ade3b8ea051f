"""`teacher=tiny_random`: a randomly initialised, SD-1.5-shaped tiny pipeline built from config in seconds.

For tests and smoke runs: it is written once into the cache in the diffusers
folder layout and then loaded exactly as Stable Diffusion is.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from . import Teacher, load_teacher
from .tokenizer import build_clip_tokenizer

DEFAULT_ARCH = dict(
    seed=0, prediction_type="epsilon", unet_channels=[32, 64], layers_per_block=1, cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=8, vae_channels=[16, 32, 32], text_hidden=32, text_layers=2,
    text_heads=4, max_length=32, sample_size=8, vae_layers_per_block=1, text_intermediate=None,
)
WORDS = "a an the small large big red green blue yellow purple orange white black gray grey circle square " \
        "triangle cross in on at of top bottom left right center middle background and photo".split()


def build_folder(path: Path, arch: dict) -> None:
    """Writes a tiny random SD-shaped pipeline (unet, vae, text_encoder, tokenizer, scheduler) to `path`."""
    save_pipeline_folder(path, **build_components(arch))


def build_components(arch: dict) -> dict:
    """A random SD-shaped pipeline's components from `arch` (any size: the default is tiny; see sd15_random),
    drawn from `arch.seed` without touching torch's global generator (a run then draws the same whether the
    teacher was built now or found in the cache)."""
    with torch.random.fork_rng():
        return _build_components({**DEFAULT_ARCH, **arch})


def _build_components(a: dict) -> dict:
    torch.manual_seed(a["seed"])
    ch, n = list(a["unet_channels"]), len(a["unet_channels"])
    unet = UNet2DConditionModel(
        sample_size=a["sample_size"], in_channels=4, out_channels=4, block_out_channels=ch, layers_per_block=a["layers_per_block"],
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        cross_attention_dim=a["cross_attention_dim"], attention_head_dim=a["attention_head_dim"],
        norm_num_groups=a["norm_num_groups"])
    vch = list(a["vae_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vch,
                        down_block_types=["DownEncoderBlock2D"] * len(vch), up_block_types=["UpDecoderBlock2D"] * len(vch),
                        layers_per_block=a["vae_layers_per_block"], norm_num_groups=a["norm_num_groups"],
                        sample_size=a["sample_size"] * 2 ** (len(vch) - 1))
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=a["max_length"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=a["text_hidden"], intermediate_size=a["text_intermediate"] or 2 * a["text_hidden"],
        projection_dim=a["cross_attention_dim"], num_hidden_layers=a["text_layers"], num_attention_heads=a["text_heads"],
        max_position_embeddings=a["max_length"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    assert a["text_hidden"] == a["cross_attention_dim"], "text_hidden must equal cross_attention_dim"
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=a["prediction_type"], clip_sample=False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_pipeline_folder(path: Path, **components) -> None:
    """Saves components in the StableDiffusionPipeline layout, atomically (a partial folder is never left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        for sub, comp in components.items():
            comp.save_pretrained(tmp / sub)
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                 "requires_safety_checker": False, "safety_checker": [None, None], "feature_extractor": [None, None],
                 "image_encoder": [None, None]}
        libs = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers", "text_encoder": "transformers",
                "tokenizer": "transformers"}
        for sub, comp in components.items():
            index[sub] = [libs[sub], type(comp).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        try:
            os.rename(tmp, path)
        except OSError:  # another process built it first
            if not (path / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_folder(cache_dir: str, prefix: str, spec: dict) -> Path:
    key = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / "teachers" / f"{prefix}-{key}"


def load(name: str, pretrained: str | None, cache_dir: str, arch: dict, in_memory: bool,
         cast_to_mixed_precision: bool) -> Teacher:
    """`conf/teacher/tiny_random.yaml`'s and `sd15_random.yaml`'s target: built from `arch` (keys of DEFAULT_ARCH)
    into `cache_dir` once, or (`in_memory`: benchmarks at a large size) in memory, writing nothing."""
    if in_memory:
        c = build_components(arch or {})
        for m in (c["unet"], c["vae"], c["text_encoder"]):
            m.requires_grad_(False).eval()
        return Teacher(name=name, path=f"<in memory: {name}>", **c, cast_to_mixed_precision=cast_to_mixed_precision)
    if not pretrained:
        a = {**DEFAULT_ARCH, **(arch or {})}
        path = cached_folder(cache_dir, "tiny_random", a)
        if not (path / "model_index.json").exists():
            build_folder(path, a)
        pretrained = str(path)
    return load_teacher(name, pretrained, None, None, None, cast_to_mixed_precision)
