"""The recipe of `teacher=tiny`: a small latent diffusion model trained from scratch on `data=shapes`.

Three stages, each seeded, with progress bars:

1. **VAE** (`AutoencoderKL`, no attention, f = 2^(levels-1)) on the training images: L1 + MSE reconstruction
   weighted towards the (saturated) shape pixels, and a tiny KL term, as a near-deterministic autoencoder; `scaling_factor` = 1 / std of its latents.
2. **Latents** of every training image, encoded once (the UNet never sees pixels).
3. **UNet + text encoder** (a `UNet2DConditionModel` and a `CLIPTextModel` with the offline tokenizer of
   `tokenizer.py`), trained jointly with epsilon prediction on `DDPMScheduler(scaled_linear, 1000)`, with
   caption dropout (an empty caption ``""`` for `caption_dropout` of the examples) so classifier-free guidance
   works, and an EMA of the weights (the EMA is what is saved).

`build(path, arch, build)` writes the StableDiffusionPipeline folder; `arch` and `build` are the
`teacher.arch` / `teacher.build` dicts of `conf/teacher/tiny.yaml` over the defaults below.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from ..data.shapes import ALL_SCENES, caption, ensure_shards
from .tokenizer import build_clip_tokenizer

log = logging.getLogger(__name__)

#: Architecture: 32 px images -> 8x8x4 latents; a ~3.3M-parameter 3-level UNet; a 2-layer CLIP text encoder.
DEFAULT_ARCH = dict(
    resolution=32, latent_channels=4, vae_channels=[16, 32, 32], vae_layers_per_block=1, vae_norm_groups=8,
    unet_channels=[48, 96, 96], unet_layers_per_block=1, unet_attention_heads=8, unet_norm_groups=16,
    unet_attention_levels=2,
    text_hidden=64, text_layers=2, text_heads=4, max_length=16, prediction_type="epsilon",
)
#: Training recipe (all seeds and hyperparameters). `device` is not part of the recipe's identity.
DEFAULT_BUILD = dict(
    seed=0, num_samples=30000, data_seed=0,
    vae_steps=13000, vae_batch=32, vae_lr=1e-3, vae_kl=1e-6, vae_fg_weight=20.0,
    unet_steps=5000, unet_batch=64, unet_lr=1e-3, unet_warmup=200, unet_weight_decay=0.0,
    text_lr=5e-4, caption_dropout=0.1, ema_decay=0.999, grad_clip=1.0,
)
NOT_RECIPE = ("device", "threads")  # keys of `build` that do not change the weights


def vocabulary() -> list[str]:
    """Every word of every shapes caption: the tokenizer makes each one a single token."""
    return sorted({w for s in ALL_SCENES for w in caption(s).split()})


def make_models(arch: dict):
    a = {**DEFAULT_ARCH, **arch}
    vch = list(a["vae_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=a["latent_channels"], block_out_channels=vch,
        layers_per_block=a["vae_layers_per_block"], down_block_types=["DownEncoderBlock2D"] * len(vch),
        up_block_types=["UpDecoderBlock2D"] * len(vch), norm_num_groups=a["vae_norm_groups"],
        sample_size=a["resolution"], mid_block_add_attention=False)
    tokenizer = build_clip_tokenizer(vocabulary(), model_max_length=a["max_length"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=a["text_hidden"], intermediate_size=4 * a["text_hidden"],
        projection_dim=a["text_hidden"], num_hidden_layers=a["text_layers"], num_attention_heads=a["text_heads"],
        max_position_embeddings=a["max_length"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    ch, n = list(a["unet_channels"]), len(a["unet_channels"])
    m = min(n, int(a["unet_attention_levels"]))  # resolution levels with (self + cross) attention, finest first
    unet = UNet2DConditionModel(
        sample_size=a["resolution"] // 2 ** (len(vch) - 1), in_channels=a["latent_channels"],
        out_channels=a["latent_channels"], block_out_channels=ch, layers_per_block=a["unet_layers_per_block"],
        down_block_types=["CrossAttnDownBlock2D"] * m + ["DownBlock2D"] * (n - m),
        up_block_types=["UpBlock2D"] * (n - m) + ["CrossAttnUpBlock2D"] * m,
        cross_attention_dim=a["text_hidden"], attention_head_dim=a["unet_attention_heads"],
        norm_num_groups=a["unet_norm_groups"])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=a["prediction_type"], clip_sample=False,
                              steps_offset=1)
    return vae, text_encoder, tokenizer, unet, scheduler


def load_images(cache_dir: str, num_samples: int, resolution: int, seed: int):
    """The `data=shapes` training split (its WebDataset shards, cached) as uint8 NCHW images and captions."""
    import webdataset as wds

    urls = ensure_shards(cache_dir, "train", num_samples, resolution, seed)
    images, captions = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        images.append(np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")))
        captions.append(sample["txt"].decode("utf-8"))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def _pixels(u8: torch.Tensor, device) -> torch.Tensor:
    return u8.to(device).float() / 127.5 - 1.0


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae: AutoencoderKL, images: torch.Tensor, b: dict, device, log_metric: Callable) -> None:
    g = torch.Generator().manual_seed(b["seed"] + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=b["vae_lr"], weight_decay=0.0)
    vae.train().to(device)
    bar = tqdm(range(b["vae_steps"]), desc="tiny teacher 1/3: VAE", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = b["vae_lr"] * _cosine(step, b["vae_steps"], 100)
        x = _pixels(images[torch.randint(0, len(images), (b["vae_batch"],), generator=g)], device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        # shapes are a few percent of the pixels and the only saturated ones (backgrounds are white, gray or
        # black): weight pixels by saturation so that the shape's colour and outline are what is learnt
        weight = 1.0 + b["vae_fg_weight"] * (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2
        err = rec - x
        loss_rec = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean()
        loss = loss_rec + b["vae_kl"] * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), b["grad_clip"])
        opt.step()
        if step % 50 == 0 or step == b["vae_steps"] - 1:
            bar.set_postfix(rec=f"{loss_rec.item():.4f}")
            log_metric("vae/rec_loss", loss_rec.item(), step)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    out = [vae.encode(_pixels(images[i:i + batch], device)).latent_dist.mean
           for i in tqdm(range(0, len(images), batch), desc="tiny teacher 2/3: latents", unit="batch")]
    return torch.cat(out)


def train_unet(unet, text_encoder, tokenizer, scheduler, latents, captions, b: dict, device,
               log_metric: Callable, work: Path | None = None, every: int = 250):
    """Joint UNet + text-encoder training on precomputed latents; returns the EMA copies. With `work`, the
    full training state (networks, EMAs, optimiser, generator, step) is saved there every `every` steps and
    an interrupted build continues from it, drawing the same random numbers it would have drawn."""
    g = torch.Generator().manual_seed(b["seed"] + 2)
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    unet.train().to(device)
    text_encoder.train().to(device)
    opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": b["unet_lr"]},
                             {"params": text_encoder.parameters(), "lr": b["text_lr"]}],
                            weight_decay=b["unet_weight_decay"])
    base = [grp["lr"] for grp in opt.param_groups]
    ema_unet, ema_text = (copy.deepcopy(m).requires_grad_(False).eval() for m in (unet, text_encoder))
    pairs = [(e, p) for m, em in ((unet, ema_unet), (text_encoder, ema_text))
             for e, p in zip(em.parameters(), m.parameters())]
    acp = scheduler.alphas_cumprod.to(device)
    latents = latents.to(device)
    nets = dict(unet=unet, text=text_encoder, ema_unet=ema_unet, ema_text=ema_text, opt=opt)
    start, ckpt = 0, (work / "unet_state.pt") if work else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        for k, m in nets.items():
            m.load_state_dict(state[k])
        g.set_state(state["generator"])
        start = state["step"]
        log.info("tiny teacher: UNet training continues from step %d (%s)", start, ckpt)
    bar = tqdm(range(start, b["unet_steps"]), desc="tiny teacher 3/3: UNet + text encoder", unit="step",
               initial=start, total=b["unet_steps"])
    window = []
    for step in bar:
        f = _cosine(step, b["unet_steps"], b["unet_warmup"])
        for grp, lr in zip(opt.param_groups, base):
            grp["lr"] = lr * f
        idx = torch.randint(0, len(latents), (b["unet_batch"],), generator=g)
        z0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < b["caption_dropout"]  # classifier-free guidance: "" captions
        tok[drop] = empty
        noise = torch.randn(z0.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g).to(device)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        hidden = text_encoder(tok.to(device))[0]
        pred = unet(zt, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), b["grad_clip"])
        opt.step()
        decay = min(b["ema_decay"], (1 + step) / (10 + step))  # warm-up of the EMA
        with torch.no_grad():
            torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1.0 - decay)
        window.append(loss.item())
        if len(window) == 50 or step == b["unet_steps"] - 1:
            bar.set_postfix(loss=f"{np.mean(window):.4f}")
            log_metric("unet/loss", float(np.mean(window)), step)
            window = []
        if ckpt is not None and (step + 1) % every == 0 and step + 1 < b["unet_steps"]:
            state = {k: m.state_dict() for k, m in nets.items()} | {"generator": g.get_state(), "step": step + 1}
            torch.save(state, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)  # atomic: a kill mid-save keeps the previous state
    return ema_unet, ema_text


def build(path: Path, arch: dict, build: dict, cache_dir: str = "~/.cache/lcm_exp",
          log_metric: Callable | None = None) -> dict:
    """Trains the tiny teacher with this recipe and writes it to `path` (StableDiffusionPipeline layout).
    Returns timings and the VAE's scaling factor."""
    from .tiny_random import save_pipeline_folder

    a, b = {**DEFAULT_ARCH, **arch}, {**DEFAULT_BUILD, **build}
    log_metric = log_metric or (lambda *_: None)
    device = torch.device(b.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # TF32 matmuls: the tiny models are launch-bound there, but it costs nothing
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(b["seed"])
    times = {}
    t0 = time.perf_counter()
    vae, text_encoder, tokenizer, unet, scheduler = make_models(a)
    images, captions = load_images(cache_dir, b["num_samples"], a["resolution"], b["data_seed"])
    times["data_s"] = time.perf_counter() - t0
    # stages survive an interruption: <path>.partial/ holds the trained VAE and the UNet training state
    work = Path(str(path) + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    stamp = json.dumps({"arch": a, "build": {k: v for k, v in b.items() if k not in NOT_RECIPE}}, sort_keys=True)
    if not (work / "recipe.json").exists() or (work / "recipe.json").read_text() != stamp:
        shutil.rmtree(work)
        work.mkdir(parents=True)
        (work / "recipe.json").write_text(stamp)
    if (work / "vae.pt").exists():
        vae.load_state_dict(torch.load(work / "vae.pt", map_location="cpu"))
        vae.eval().requires_grad_(False).to(device)
        log.info("tiny teacher: the VAE stage is done already (%s)", work / "vae.pt")
    else:
        train_vae(vae, images, b, device, log_metric)
        torch.save(vae.state_dict(), work / "vae.tmp")
        (work / "vae.tmp").replace(work / "vae.pt")
    times["vae_s"] = time.perf_counter() - t0 - times["data_s"]
    latents = encode_all(vae, images, device)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    ema_unet, ema_text = train_unet(unet, text_encoder, tokenizer, scheduler, latents * scaling, captions, b,
                                    device, log_metric, work=work)
    times["unet_s"] = time.perf_counter() - t0 - times["data_s"] - times["vae_s"]
    parts = dict(unet=ema_unet, vae=vae, text_encoder=ema_text)
    for m in parts.values():
        m.to("cpu")
    # fp16 weights for the UNet and VAE (half the size; loaded back as fp32), fp32 for the small text encoder
    save_pipeline_folder(path, unet=ema_unet.half(), vae=vae.half(), text_encoder=ema_text.float(),
                         tokenizer=tokenizer, scheduler=scheduler)
    ema_unet.float(), vae.float()
    shutil.rmtree(work, ignore_errors=True)
    times["total_s"] = time.perf_counter() - t0
    return {**times, "scaling_factor": scaling, "device": str(device)}
