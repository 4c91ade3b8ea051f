"""`method=tcd`: trajectory consistency distillation (Zheng et al. 2024, "Trajectory Consistency Distillation").

The student learns the trajectory consistency function f_θ(x_t, t, s), which maps a point at t to any s ∈ [0, t]
on the teacher's probability-flow trajectory, in the first-order exponential-integrator (semi-linear) form,
which is DDIM's step t → s with the student's own x̂0 and ε̂ (TCD eq. 7-8; no c_skip/c_out, s is no input):

    f_θ(x_t, t, s) = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) x̂0 = α_s x̂0 + σ_s ε̂,   h = λ_s − λ_t, λ = log(α/σ).

One step (the training of the public TCD code, rootonchair/consistency_models_distill `tcd/train_tcd_distill_sd_wds.py`,
the paper's authors released none): a pair (t_{n+k}, t_n) on the skip-step grid as LCD draws it, an end index
m ~ U{0..n} and s = max(t_{m+k} − k, 0) ≤ t_n; the teacher's guided solver step t_{n+k} → t_n (as LCD); the
loss d(f_θ(x_{t_{n+k}}, t_{n+k}, s), f_θ⁻(x̂_{t_n}, t_n, s)) with the target network f_θ⁻. At m = n the target is
the teacher's point itself (f(x, t, t) = x).

Students sample with diffusers' `TCDScheduler` (Strategic Stochastic Sampling): `method.gamma` is its `eta`
(0: deterministic DDIM steps; 1: LCM-like re-noising from s = 0).
"""
from __future__ import annotations

import torch

from .base import Method, Sampling, vp_scheduler
from .lcd import Distillation


def trajectory_fn(schedule, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """f(z_t, t, s) = α_s x̂0 + σ_s ε̂ from a network's output `out` at (z_t, t) (any parameterisation)."""
    x0, eps = schedule.x0_and_eps(out, t, z)
    alpha_s, sigma_s = schedule.alpha_sigma(s, z)
    return alpha_s * x0 + sigma_s * eps


class TrajectoryConsistency(Method):
    """TCD (see the module docstring); `gamma`: the sampler's stochasticity γ (TCDScheduler's `eta`)."""

    def __init__(self, gamma: float):
        if not 0.0 <= gamma <= 1.0:
            from ...config import invalid

            raise invalid("method.gamma", gamma, "a number in [0, 1] (TCDScheduler's eta)")
        self.gamma = float(gamma)

    def end_time(self, step, t_start: torch.Tensor, draws) -> torch.Tensor:
        """s = max(t_{m+k} − k, 0) with m ~ U{0..n} (t_start = t_{n+k}), one per row."""
        k = step.skip.k
        n = (t_start.cpu() + 1) // k - 1  # (the index of t_{n+k} on the grid t = (1..N)·k − 1)
        m = torch.cat([torch.randint(0, int(i) + 1, (1,), generator=g) for i, g in zip(n, draws.generators)])
        return ((m + 1) * k - 1 - k).clamp(min=0).to(t_start.device)

    def loss(self, step, latents: torch.Tensor, cond: dict, uncond: dict, draws) -> torch.Tensor:
        # (t_{n+k}, t_n), ε, ω and z_{t_{n+k}} as LCD draws them; then the end time s ≤ t_n.
        x = step.noised(latents, draws)
        s = self.end_time(step, x.t, draws)
        # The teacher's guided solver step to t_n (LCM eq. 8), and the target f_θ⁻(x̂_{t_n}, t_n, s).
        z_prev = step.solver_step(x, cond, uncond)
        target = trajectory_fn(step.schedule, step.frozen(step.target, z_prev.to(latents.dtype), x.t_prev, cond,
                                                          timestep_cond=x.w_emb), z_prev, x.t_prev, s)
        # The online f_θ(z_{t_{n+k}}, t_{n+k}, s).
        out = step.student(x.z_t, x.t, timestep_cond=x.w_emb, **cond).sample
        online = trajectory_fn(step.schedule, out, x.z_t, x.t, s)
        return step.distance(online.float(), target.float())

    def target_point(self, step, x, cond: dict, uncond: dict) -> torch.Tensor:
        return Distillation.target_point(self, step, x, cond, uncond)

    def sampling(self, teacher, grid_steps: int, timestep_scaling: float) -> Sampling:
        """`TCDScheduler` on the training's skip-step grid (`original_inference_steps` = N), `eta` = γ, in the
        teacher family's pipeline (which passes `eta`)."""
        scheduler = vp_scheduler("TCDScheduler", teacher, "method=tcd", original_inference_steps=grid_steps)
        return Sampling(scheduler, lambda n: {"eta": self.gamma}, plain=True)
