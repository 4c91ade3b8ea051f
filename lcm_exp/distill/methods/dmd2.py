"""`method=dmd2`: improved distribution matching distillation (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis"), following the official code (tianweiy/DMD2, `main/sd_guidance.py`,
`main/sd_unified_model.py`, `main/train_sd.py`).

No ODE solver: the student is a generator G_θ that turns noise into an image in one step (at t = T − 1), or in
`method.generator_steps` steps at t = T − 1, T − 1 − T/K, ... with re-noising between them. Its output is the
student's consistency function (c_skip ≈ 0 at every such t, so it is its x̂0). Two scores compare the generator's
samples x̂ with the data: the *real* score, the teacher with classifier-free guidance (LCM's ω from `guidance`,
i.e. a diffusers guidance scale ω + 1; DMD2's SD-1.5 run uses 1.75: ω = 0.75), and the *fake* score, a trainable
copy of the teacher that keeps learning to denoise the generator's current samples (`method.fake_updates`
updates per generator update, learning rate `method.fake_lr`). The generator's loss moves x̂ along the difference
of the two scores' x0 predictions at a random t ∈ [min_t, max_t]·T, normalised per sample
(`compute_distribution_matching_loss`):

    g = (x̂0_fake − x̂0_real) / mean|x̂ − x̂0_real|,      L_DM = ½ ‖x̂ − sg(x̂ − g)‖² / numel   (∇_x̂ L_DM = g / numel)

The fake score's loss is the teacher's own denoising loss on sg(x̂) at t ~ U{0..T−1} (`compute_loss_fake`).

Multi-step generators train on their own backward simulation (`sample_backward`): each sample draws k ~ U{0..K−1},
runs the current generator k steps without gradients, and trains at the k-th timestep (at T − 1 on pure
noise). The optional GAN head on the fake score's features is not built here. The `loss` group does not apply
(the loss is L_DM); the `solver` and `skip` groups neither.

Students sample with LCM's multistep consistency sampler at the generator's timesteps (`LCMScheduler` with
explicit `timesteps`, as the DMD2 README does in diffusers).
"""
from __future__ import annotations

import copy

import torch

from ..guidance import guidance_embedding
from .base import Auxiliary, Method, Sampling


def generator_timesteps(n: int, num_train_timesteps: int) -> list[int]:
    """The timesteps an n-step generator visits: T − 1, T − 1 − T/n, ... (DMD2's `denoising_step_list`)."""
    return [num_train_timesteps - 1 - i * (num_train_timesteps // n) for i in range(n)]


def dm_loss(x0_g: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """L_DM of DMD2 (see the module docstring): its gradient with respect to x0_g is the normalised score
    difference divided by the number of elements."""
    with torch.no_grad():
        scale = (x0_g - x0_real).abs().mean(dim=list(range(1, x0_g.ndim)), keepdim=True)
        g = torch.nan_to_num((x0_fake - x0_real) / scale)
    return 0.5 * torch.nn.functional.mse_loss(x0_g.float(), (x0_g - g).detach().float())


def base_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A trainable fp32 copy of a teacher UNet with its own (base) weights: the adapters a LoRA student put into
    it left out."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel) or not getattr(unet, "peft_config", None):
        return copy.deepcopy(unet).float().requires_grad_(True)
    base = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    net = UNet2DConditionModel.from_config(unet.config)
    net.load_state_dict(base)
    return net.float().requires_grad_(True)


class DistributionMatching(Method):
    """DMD2 (see the module docstring)."""

    def __init__(self, fake_updates: int, fake_lr: float, fake_weight_decay: float, generator_steps: int,
                 min_t: float, max_t: float, fake_max_grad_norm: float):
        from ...config import invalid

        checks = [(fake_updates >= 1, "fake_updates", fake_updates, ">= 1 (DMD2: 10 for SD-1.5, 5 for SDXL)"),
                  (fake_lr > 0, "fake_lr", fake_lr, "> 0"), (generator_steps >= 1, "generator_steps",
                                                             generator_steps, ">= 1"),
                  (0 <= min_t < max_t <= 1, "min_t", f"{min_t} (max_t {max_t})", "0 <= min_t < max_t <= 1")]
        for ok, key, value, expected in checks:
            if not ok:
                raise invalid(f"method.{key}", value, expected)
        self.fake_updates, self.fake_lr, self.fake_weight_decay = int(fake_updates), float(fake_lr), fake_weight_decay
        self.generator_steps, self.min_t, self.max_t = int(generator_steps), float(min_t), float(max_t)
        self.fake_max_grad_norm = float(fake_max_grad_norm)

    def auxiliary(self, teacher, student) -> dict[str, Auxiliary]:
        """The fake score: a trainable copy of the teacher, AdamW at `fake_lr` (DMD2's guidance model)."""
        def optimizer(params):
            return torch.optim.AdamW(params, lr=self.fake_lr, weight_decay=self.fake_weight_decay)

        return {"fake": Auxiliary(base_copy(teacher.unet), optimizer, self.fake_max_grad_norm)}

    # ----------------------------------------------------------------------------------------------- the step
    def loss(self, step, latents: torch.Tensor, cond: dict, uncond: dict, draws) -> torch.Tensor:
        schedule, device, dtype = step.schedule, latents.device, latents.dtype
        T = schedule.num_train_timesteps
        # The generator's input: noise at T − 1, or its own backward simulation (each row: k steps of it).
        noise = draws.randn(latents.shape[1:], device, dtype)
        w = draws.each(lambda g: step.guidance.sample(1, "cpu", g)).to(device)
        w_emb = guidance_embedding(w, step.w_embedding_dim).to(dtype) if step.w_embedding_dim else None
        x_t, t = self.generator_input(step, noise, w_emb, cond, draws)
        # x̂ = G_θ(x_t, t) (with gradients).
        x0_g = step.consistency_fn(step.student, x_t, t, w_emb, cond)
        # The fake score learns to denoise the generator's current samples.
        for _ in range(self.fake_updates):
            step.update("fake", self.fake_loss(step, x0_g.detach(), cond, draws))
        # L_DM: the real (teacher, guided) and fake scores' x0 at a random t in [min_t, max_t]·T.
        lo, hi = int(self.min_t * T), min(int(self.max_t * T), T - 1)
        t_dm = draws.each(lambda g: torch.randint(lo, hi + 1, (1,), generator=g)).to(device)
        eps = draws.randn(latents.shape[1:], device, dtype)
        with torch.no_grad():
            x_dm = schedule.add_noise(x0_g.detach(), eps, t_dm)
            x0_fake, _ = schedule.x0_and_eps(step.auxiliary["fake"](x_dm, t_dm, **cond).sample.float(), t_dm, x_dm)
            x0_real, _ = step.guided_teacher(cond, uncond, w)(x_dm, t_dm)
        return dm_loss(x0_g, x0_real.float(), x0_fake.float())

    def generator_input(self, step, noise: torch.Tensor, w_emb, cond: dict, draws):
        """(x_t, t): each row's k ~ U{0..K−1} steps of the current generator from `noise`, re-noised to the k-th
        timestep (k = 0: the noise itself at T − 1)."""
        T = step.schedule.num_train_timesteps
        ts = torch.tensor(generator_timesteps(self.generator_steps, T), device=noise.device)
        k = draws.each(lambda g: torch.randint(0, self.generator_steps, (1,), generator=g)).to(noise.device)
        x = noise
        for j in range(self.generator_steps - 1):  # (every row draws its noises, used or not: a fixed sequence)
            fresh = draws.randn(noise.shape[1:], noise.device, noise.dtype)
            if not (k > j).any():
                continue
            with torch.no_grad():
                x0 = step.consistency_fn(step.student, x, ts[j].expand(len(x)), w_emb, cond)
            nxt = step.schedule.add_noise(x0, fresh, ts[j + 1].expand(len(x)))
            x = torch.where((k > j).view(-1, *[1] * (x.ndim - 1)), nxt, x)
        return x, ts[k]

    def fake_loss(self, step, x0: torch.Tensor, cond: dict, draws) -> torch.Tensor:
        """The fake score's denoising loss on the generator's samples at t ~ U{0..T−1}."""
        schedule, T = step.schedule, step.schedule.num_train_timesteps
        t = draws.each(lambda g: torch.randint(0, T, (1,), generator=g)).to(x0.device)
        eps = draws.randn(x0.shape[1:], x0.device, x0.dtype)
        out = step.auxiliary["fake"](schedule.add_noise(x0, eps, t), t, **cond).sample
        return torch.nn.functional.mse_loss(out.float(), schedule.model_output(x0, eps, t).float())

    # ------------------------------------------------------------------------------------------------ sampling
    def sampling(self, teacher, grid_steps: int, timestep_scaling: float) -> Sampling:
        T = teacher.num_train_timesteps  # (no skip grid: every timestep is on LCMScheduler's "original" grid)
        return Sampling(teacher.consistency_scheduler(T, timestep_scaling),
                        lambda n: {"timesteps": generator_timesteps(n, T)})
