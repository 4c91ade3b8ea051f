"""`method=lcd`: latent consistency distillation, one step of LCM (Luo et al. 2023) Algorithm 1.

Equation numbers refer to the LCM paper (arXiv:2310.04378)."""
from __future__ import annotations

import torch

from .base import Method


class Distillation(Method):
    """The teacher's guided solver step gives the point the target is evaluated at,
    ẑ_{t_n} = z_{t_{n+k}} + (1 + ω) Φ(z_{t_{n+k}}, t_{n+k}, t_n, c) − ω Φ(z_{t_{n+k}}, t_{n+k}, t_n, ∅) (eq. 8)."""

    def loss(self, step, latents: torch.Tensor, cond: dict, uncond: dict, draws) -> torch.Tensor:
        # Draw (t_{n+k}, t_n) on the skip-step grid, ε and ω; z_{t_{n+k}} = α z + σ ε (eq. 1, §4.2-4.3).
        x = step.noised(latents, draws)
        # The no-grad passes (teacher, target) run before the online forward when `teacher_first`: the same
        # numbers, but the student's saved activations are not held across the teacher's batch (lower peak
        # memory) and are still warm in cache when the backward pass starts.
        if not step.teacher_first:
            f_online = step.online(x, cond)  # f_θ(z_{t_{n+k}}, ω, c, t_{n+k}) (eq. 7)
        f_target = step.target_fn(x, step.solver_step(x, cond, uncond), cond)  # f_θ⁻(ẑ_{t_n}, ω, c, t_n)
        if step.teacher_first:
            f_online = step.online(x, cond)
        # L = d(f_θ, f_θ⁻) (eq. 8), l2 or pseudo-Huber.
        return step.distance(f_online.float(), f_target.float())

    def target_point(self, step, x, cond: dict, uncond: dict) -> torch.Tensor:
        return step.solver(step.guided_teacher(cond, uncond, x.w), x.z_t, x.t, x.t_prev, step.schedule)
