"""ODE solvers Φ for the teacher's probability-flow ODE, one step from t to t_prev (LCM paper eq. 8).

Every solver shares one signature (as k-diffusion's samplers do):

    solver(denoise, z, t, t_prev, schedule) -> z_prev

`denoise(z, t) -> (x0, eps)` is the teacher with classifier-free guidance already
applied (LCM paper eq. 6); `t`, `t_prev` are integer timesteps of shape (B,);
`schedule` is the teacher's noise schedule (`lcm_exp.distill.schedules`). DDIM needs only its
(α_t, σ_t); Euler and Heun are written for a VP schedule's ᾱ table.
"""
from __future__ import annotations

import torch


def _vp_table(schedule, solver: str) -> torch.Tensor:
    """The ᾱ table of a VP schedule, which Euler and Heun are written for; another family's schedule is refused."""
    table = getattr(schedule, "alphas_cumprod", None)
    if table is None:
        from ..config import ConfigError

        raise ConfigError(f"solver={solver} is written for a VP (DDPM) noise schedule, and this teacher's is "
                          f"{type(schedule).__name__}. Use solver=ddim, which needs only the schedule's (alpha_t, sigma_t).")
    return table


def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def ddim(denoise, z, t, t_prev, schedule):
    """DDIM (Song et al. 2021, eq. 12 with σ=0): z_prev = α_prev x0 + σ_prev ε. First order, exact Euler in the
    variables (z/α, σ/α); the seed's solver."""
    x0, eps = denoise(z, t)
    alpha_prev, sigma_prev = schedule.alpha_sigma(t_prev, z)
    return alpha_prev * x0 + sigma_prev * eps


def euler(denoise, z, t, t_prev, schedule):
    """Euler's method on the VP probability-flow ODE in t (Song et al. 2021 "Score SDE", eq. 13):
    dz/dt = −½ β(t) (z − ε/σ_t), σ_t = √(1 − ᾱ_t), β(t) = −d log ᾱ/dt. First order, like DDIM, but in t
    rather than in σ: a different discretisation error for the same k, the ablation the solver choice asks for."""
    _, eps = denoise(z, t)
    alphas_cumprod = _vp_table(schedule, "euler")
    log_a = alphas_cumprod.double().log()
    beta = -(log_a - torch.cat([log_a.new_zeros(1), log_a[:-1]])).to(alphas_cumprod.dtype)  # −Δ log ᾱ per step
    b, sigma = _at(beta, t, z), (1 - _at(alphas_cumprod, t, z)).sqrt()
    dt = (t_prev - t).to(z.dtype).view(-1, *([1] * (z.ndim - 1)))
    return z + dt * (-0.5 * b * (z - eps / sigma))


def heun(denoise, z, t, t_prev, schedule):
    """Heun's second-order method (Karras et al. 2022 "EDM", Alg. 1) in the variables x = z/√ᾱ,
    σ = √((1−ᾱ)/ᾱ), where dx/dσ = ε. Two guided teacher evaluations per step; its first stage is DDIM."""
    alphas_cumprod = _vp_table(schedule, "heun")
    a, a_prev = _at(alphas_cumprod, t, z), _at(alphas_cumprod, t_prev, z)
    sigma, sigma_prev = ((1 - a) / a).sqrt(), ((1 - a_prev) / a_prev).sqrt()
    x = z / a.sqrt()
    _, d1 = denoise(z, t)
    x_euler = x + (sigma_prev - sigma) * d1  # = DDIM's step
    _, d2 = denoise(x_euler * a_prev.sqrt(), t_prev)
    return (x + (sigma_prev - sigma) * 0.5 * (d1 + d2)) * a_prev.sqrt()
