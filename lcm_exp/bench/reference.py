"""The reference step of `lcm-exp-bench`: one step of diffusers' `train_lcm_distill_sd_wds.py` (LCD, DDIM solver,
a full student with the w embedding), written here the way the script writes it and sharing no code with
lcm_exp's step: the VAE, the tokenizer and the text encoder every step, two teacher passes, the teacher and the
target in fp32 (autocast does the casting), torch's default AdamW, a per-parameter EMA loop. Its helpers are
the script's formulas, each written out below. It draws its random numbers in the order ours does (posterior,
timestep index, ε, ω), each row from its own generator as ours does (diffusers' `latent_dist.sample` takes one
generator per row), so from equal weights the two compute the same loss (tests/test_bench.py)."""
from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel
from hydra.utils import instantiate


def w_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The script's `guidance_scale_embedding` (VDM's sinusoidal embedding of w · 1000)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def boundary(t: torch.Tensor, sigma_data: float = 0.5, scaling: float = 10.0):
    """The script's `scalings_for_boundary_conditions`: (c_skip, c_out) at timestep t, as (B, 1, 1, 1)."""
    st = scaling * t.float()
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def x0_eps(out: torch.Tensor, t: torch.Tensor, z: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str):
    """The script's `get_predicted_original_sample` and `get_predicted_noise`."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1).to(z.dtype)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if kind == "epsilon":
        return (z - sigma * out) / alpha, out
    if kind == "v_prediction":
        return alpha * z - sigma * out, alpha * out + sigma * z
    return out, (z - alpha * out) / sigma  # "sample"


class Reference:
    """The diffusers script's step on the bench's batch. `cfg`: the bench's config (teacher, k, ω range, loss,
    EMA decay, lr, clipping); the student starts as `student_unet` (copied)."""

    name = "reference"

    def __init__(self, cfg, student_unet: UNet2DConditionModel, batch: dict, accelerator):
        self.acc, device = accelerator, accelerator.device
        self.teacher = teacher = instantiate(cfg.teacher)
        for m in (teacher.unet, teacher.vae, teacher.text_encoder):
            m.to(device)  # fp32, as the script keeps them (autocast casts each op)
        self.unet = UNet2DConditionModel.from_config(student_unet.config).to(device).train()
        self.unet.load_state_dict(student_unet.state_dict())
        self.target = UNet2DConditionModel.from_config(student_unet.config).to(device).requires_grad_(False)
        self.target.load_state_dict(student_unet.state_dict())
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=cfg.optim.lr)  # torch's defaults otherwise
        self.max_grad_norm, self.decay = cfg.optim.max_grad_norm, cfg.ema.decay
        self.w_min, self.w_max = cfg.guidance.w_min, cfg.guidance.w_max
        self.huber_c = cfg.loss.get("huber_c") if "huber" in str(cfg.loss._target_) else None
        sched = teacher.scheduler
        self.alphas_cumprod = sched.alphas_cumprod.to(device)
        self.kind, k = sched.config.prediction_type, int(cfg.skip.k)
        self.k, n = k, sched.config.num_train_timesteps // k
        self.ddim_timesteps = (torch.arange(1, n + 1) * k - 1).to(device)  # the script's DDIMSolver grid
        self.pixels, self.captions = batch["pixels"].to(device), batch["captions"]
        tok = teacher.tokenizer
        self.tokenize = lambda captions: tok(captions, padding="max_length", max_length=tok.model_max_length,
                                             truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():  # once, as the script encodes "" once
            self.uncond = teacher.text_encoder(self.tokenize([""] * len(self.captions)))[0]

    def modules(self) -> list:
        t = self.teacher
        return [self.unet, self.target, t.unet, t.vae, t.text_encoder]

    def own(self) -> list:
        """Every tensor this path keeps: its networks and the optimiser's state."""
        return [p for m in self.modules() for p in m.parameters()] + [
            t for st in self.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]

    def step(self, generators: list[torch.Generator]) -> torch.Tensor:
        """One step; `generators`: one per row of the batch."""
        acc, teacher, ac = self.acc, self.teacher, self.alphas_cumprod
        device = self.pixels.device

        def per_row(draw):
            return torch.cat([draw(g) for g in generators])

        with acc.autocast():
            latents = teacher.vae.encode(self.pixels).latent_dist.sample(generator=list(generators))
            latents = latents * teacher.vae.config.scaling_factor
            prompt_embeds = teacher.text_encoder(self.tokenize(self.captions))[0]  # the script's encode_prompt
            index = per_row(lambda g: torch.randint(0, len(self.ddim_timesteps), (1,), generator=g)).to(device)
            start = self.ddim_timesteps[index]
            end = (start - self.k).clamp(min=0)
            c_skip_start, c_out_start = boundary(start)
            c_skip, c_out = boundary(end)
            noise = per_row(lambda g: torch.randn((1, *latents.shape[1:]), generator=g)).to(device)
            a = ac[start].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            w = (self.w_min + (self.w_max - self.w_min) * per_row(lambda g: torch.rand(1, generator=g))).to(device)
            w_emb = w_embedding(w, self.unet.config.time_cond_proj_dim)
            w = w.view(-1, 1, 1, 1)
            out = self.unet(noisy, start, timestep_cond=w_emb, encoder_hidden_states=prompt_embeds).sample
            model_pred = c_skip_start * noisy + c_out_start * x0_eps(out, start, noisy, ac, self.kind)[0]
            with torch.no_grad():
                cond_x0, cond_eps = x0_eps(teacher.unet(noisy, start, encoder_hidden_states=prompt_embeds).sample
                                           .float(), start, noisy, ac, self.kind)
                uncond_x0, uncond_eps = x0_eps(teacher.unet(noisy, start, encoder_hidden_states=self.uncond).sample
                                               .float(), start, noisy, ac, self.kind)
                pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)
                pred_eps = cond_eps + w * (cond_eps - uncond_eps)
                a_prev = ac[end].view(-1, 1, 1, 1)
                x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_eps  # DDIMSolver.ddim_step
                target_out = self.target(x_prev.float(), end, timestep_cond=w_emb,
                                         encoder_hidden_states=prompt_embeds).sample
                target = c_skip * x_prev + c_out * x0_eps(target_out, end, x_prev, ac, self.kind)[0]
            d = model_pred.float() - target.float()
            loss = (torch.mean(d * d) if self.huber_c is None
                    else torch.mean(torch.sqrt(d * d + self.huber_c ** 2) - self.huber_c))
            acc.backward(loss)
            acc.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # the script's update_ema: one parameter at a time
            for targ, src in zip(self.target.parameters(), self.unet.parameters()):
                targ.detach().mul_(self.decay).add_(src, alpha=1 - self.decay)
        return loss.detach()
