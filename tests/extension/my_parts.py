"""A user's own parts, in a module of theirs (not in lcm_exp/): one of each pluggable kind, each named by
`_target_` in a YAML option of theirs (`conf/<group>/<name>.yaml`, found through `hydra.searchpath`).
tests/test_extension.py trains a few steps with each."""
from __future__ import annotations

import torch

from lcm_exp.distill.methods import Auxiliary, Distillation
from lcm_exp.students import Student, full


def midpoint(denoise, z, t, t_prev, schedule):
    """A solver: the explicit midpoint rule in DDIM's variables (x = z/α, σ' = σ/α), two teacher calls."""
    alpha, sigma = schedule.alpha_sigma(t, z)
    alpha_prev, sigma_prev = schedule.alpha_sigma(t_prev, z)
    t_mid = (t + t_prev) // 2
    alpha_mid, sigma_mid = schedule.alpha_sigma(t_mid, z)
    x, s, s_prev, s_mid = z / alpha, sigma / alpha, sigma_prev / alpha_prev, sigma_mid / alpha_mid
    _, eps = denoise(z, t)
    x_mid = x + (s_mid - s) * eps
    _, eps_mid = denoise(x_mid * alpha_mid, t_mid)
    return (x + (s_prev - s) * eps_mid) * alpha_prev


def l1(pred, target, scale: float):
    """A loss with a setting of its own: scale · mean |f_θ − f_θ⁻|."""
    return scale * (pred.float() - target.float()).abs().mean()


class Interpolated(Distillation):
    """A method: the target point between the teacher's solver step and consistency training's estimate."""

    def __init__(self, mix: float):
        self.mix = float(mix)

    def target_point(self, step, x, cond, uncond):
        distilled = super().target_point(step, x, cond, uncond)
        estimated = step.schedule.add_noise(x.latents, x.noise, x.t_prev)
        return (1 - self.mix) * distilled + self.mix * estimated


class Critic(Distillation):
    """A method with an auxiliary network: LCD plus an adversarial term. A small critic learns to tell the
    target's consistency outputs from the online student's (hinge loss, its own Adam optimiser, one update per
    micro-step); the student's loss adds `weight` · softplus(−critic(f_θ))."""

    def __init__(self, weight: float, lr: float):
        self.weight, self.lr = float(weight), float(lr)

    def auxiliary(self, teacher, student):
        channels = teacher.unet.config.in_channels
        critic = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.SiLU(),
                                     torch.nn.Conv2d(8, 1, 3, padding=1))
        return {"critic": Auxiliary(critic, lambda params: torch.optim.Adam(params, lr=self.lr))}

    def loss(self, step, latents, cond, uncond, draws):
        x = step.noised(latents, draws)
        f_target = step.target_fn(x, step.solver_step(x, cond, uncond), cond)
        f_online = step.online(x, cond)
        critic = step.auxiliary["critic"]
        real, fake = critic(f_target.detach().float()), critic(f_online.detach().float())
        step.update("critic", torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
        adversarial = torch.nn.functional.softplus(-critic(f_online.float())).mean()
        return step.distance(f_online.float(), f_target.float()) + self.weight * adversarial


class Constant:
    """A guidance sampler: the same w for every example."""

    def __init__(self, w: float):
        self.mid = float(w)

    def sample(self, n: int, device="cpu", generator=None):
        return torch.full((n,), self.mid, device=device)


class HeadOnlyStudent(Student):
    """A student kind: the full student with only its output layers trained."""

    kind = "head_only"


def head_only(teacher, time_cond_proj_dim: int, sigma_data: float, timestep_scaling: float, trained: list):
    base = full(teacher, time_cond_proj_dim, sigma_data, timestep_scaling, stochastic_depth=0.0)
    for name, p in base.unet.named_parameters():
        p.requires_grad_(any(name.startswith(prefix) for prefix in trained))
    return HeadOnlyStudent(base.unet, time_cond_proj_dim, sigma_data, timestep_scaling)
