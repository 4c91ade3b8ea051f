"""`method=pcm`: phased consistency models (Wang et al. 2024, "Phased Consistency Model"), following the official
code (G-U-N/Phased-Consistency-Model, `code/text_to_image_sd15/train_pcm_lora_sd15_adv.py`).

The teacher's trajectory on the skip-step grid t = (1..N)·k − 1 is cut into M phases (`method.phases`) at the
edges e_j = t̄_{⌊jN/M⌋}, j = 0..M−1 (t̄_i = t_i − k, the grid point below t_i, and t̄_0 = 0): for N = 50, M = 4 the
edges are 0, 239, 499, 739. Within a phase the student is a consistency model whose boundary is the phase's
lower edge e(t): it maps x_t by a DDIM step with its own x̂0, ε̂ to that edge,

    f_θ(x_t, t) = α_{e(t)} x̂0 + σ_{e(t)} ε̂   (no c_skip/c_out; f(x_e, e) = x_e).

One step: (t_{n+k}, t_n) on the grid, ε, ω and x_{t_{n+k}} as LCD draws them; the teacher's guided solver step to
t_n; the target f_θ⁻(x̂_{t_n}, t_n) mapped to the *same* edge, or x̂_{t_n} itself when t_n is an edge (the
official code's c_skip = 1[index ∈ edges]); the loss d(f_θ, target) (the official default is pseudo-Huber
with c = 0.001: `loss=huber`). The official target is the online student without gradients: `ema.decay=0`
gives that; the default keeps the EMA target of the other methods. The optional adversarial term of the official
code (a discriminator on the teacher's features) is not built here.

Students sample deterministically through the phase edges: diffusers' `TCDScheduler` with `eta` = 0 and the
timesteps [T−1, e_{M−1}, ..., e_1] (then 0), each step a DDIM step to the next edge, as in training. Other step
counts take every ⌈M/n⌉-th phase (fewer steps) or split each phase evenly (more).
"""
from __future__ import annotations

import math

import torch

from .base import Method, Sampling, vp_scheduler
from .lcd import Distillation
from .tcd import trajectory_fn


def phase_edges(grid_steps: int, k: int, phases: int) -> list[int]:
    """The lower edges of the M phases on the grid (t̄_i = i·k − 1, t̄_0 = 0), ascending."""
    index = [math.floor(j * grid_steps / phases) for j in range(phases)]
    return [max(i * k - 1, 0) for i in index]


def sampler_timesteps(n: int, edges: list[int], top: int) -> list[int]:
    """The timesteps an n-step PCM sampler visits (descending; the last step goes to 0): the phase edges, every
    ⌈M/n⌉-th for fewer steps, each phase split evenly for more."""
    starts = [top] + edges[1:][::-1]  # each phase's first timestep, from the top
    ends = edges[::-1]  # each phase's lower edge
    if n <= len(starts):
        pick = [math.floor(j * len(starts) / n) for j in range(n)]
        return [starts[i] for i in pick]
    out = []
    for i, (a, b) in enumerate(zip(starts, ends)):
        q = n // len(starts) + (1 if i < n % len(starts) else 0)
        out += [round(a - j * (a - b) / q) for j in range(q)]
    return out


class PhasedConsistency(Method):
    """PCM (see the module docstring); `phases`: M."""

    def __init__(self, phases: int):
        if phases < 1:
            from ...config import invalid

            raise invalid("method.phases", phases, "an integer >= 1 (the official SD-1.5 and SDXL runs use 4)")
        self.phases = int(phases)

    def edges(self, step) -> torch.Tensor:
        if self.phases > step.skip.num_steps:
            from ...config import invalid

            raise invalid("method.phases", self.phases, f"at most the {step.skip.num_steps} steps of the skip grid "
                          f"(skip.k={step.skip.k})")
        return torch.tensor(phase_edges(step.skip.num_steps, step.skip.k, self.phases))

    def loss(self, step, latents: torch.Tensor, cond: dict, uncond: dict, draws) -> torch.Tensor:
        # (t_{n+k}, t_n), ε, ω and x_{t_{n+k}} as LCD draws them; the edge below t_{n+k}: e = max{e_j <= t_n}.
        x = step.noised(latents, draws)
        edges = self.edges(step).to(x.t.device)
        edge = edges[(edges[None, :] <= x.t_prev[:, None]).sum(1) - 1]
        on_edge = (edges[None, :] == x.t_prev[:, None]).any(1)
        # The teacher's guided solver step to t_n, and the target at the same edge (x̂_{t_n} itself on an edge).
        z_prev = step.solver_step(x, cond, uncond)
        out = step.frozen(step.target, z_prev.to(latents.dtype), x.t_prev, cond, timestep_cond=x.w_emb)
        target = trajectory_fn(step.schedule, out, z_prev, x.t_prev, edge)
        target = torch.where(on_edge.view(-1, *[1] * (z_prev.ndim - 1)), z_prev, target)
        # The online f_θ(x_{t_{n+k}}, t_{n+k}) at its phase's edge.
        out = step.student(x.z_t, x.t, timestep_cond=x.w_emb, **cond).sample
        return step.distance(trajectory_fn(step.schedule, out, x.z_t, x.t, edge).float(), target.float())

    def target_point(self, step, x, cond: dict, uncond: dict) -> torch.Tensor:
        return Distillation.target_point(self, step, x, cond, uncond)

    def sampling(self, teacher, grid_steps: int, timestep_scaling: float) -> Sampling:
        scheduler = vp_scheduler("TCDScheduler", teacher, "method=pcm", original_inference_steps=grid_steps)
        k = teacher.num_train_timesteps // grid_steps
        edges, top = phase_edges(grid_steps, k, self.phases), grid_steps * k - 1
        return Sampling(scheduler, lambda n: {"eta": 0.0, "timesteps": sampler_timesteps(n, edges, top)}, plain=True)
