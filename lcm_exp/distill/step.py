"""The parts one training step of a few-step distillation method works with, and the math they share: the
networks (online student f_θ, its target f_θ⁻, the frozen teacher), the teacher's noise schedule, the solver,
the skip-step grid, the guidance sampler and the distance; the consistency function, the teacher's guided
prediction, the step's draws and the noisy latents. The method (`lcm_exp.distill.methods`) says what the step
computes from them: `Step.loss` is its loss.

Equation numbers refer to the LCM paper (arXiv:2310.04378); "CM" to Song et al.
2023, Consistency Models (arXiv:2303.01469).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from .draws import Draws
from .guidance import guidance_embedding
from .schedules import bcast as _bcast
from .schedules import x0_and_eps  # noqa: F401  (re-exported: the math of eq. 1 next to the step that uses it)
from .skip import SkipSchedule


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip(t), c_out(t) of the consistency parameterisation (CM eq. 7, LCM eq. 3), with t scaled by s so that
    c_skip(0) = 1 and c_out(0) = 0 (the boundary condition f(x, 0) = x) while c_skip → 0 quickly away from 0."""
    st = timestep_scaling * t.double()
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.float(), c_out.float()


def _cast(cond, dtype: torch.dtype):
    """The floating tensors of a (nested) conditioning dict in `dtype`."""
    if isinstance(cond, dict):
        return {k: _cast(v, dtype) for k, v in cond.items()}
    return cond.to(dtype) if torch.is_tensor(cond) and cond.is_floating_point() else cond


def native_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype every parameter of a frozen network holds when it is one low-precision dtype (bf16/fp16), else
    None. Such a network runs natively, outside autocast: autocast would upcast its GroupNorms and softmaxes to
    fp32 and re-cast around each op, which costs time and memory traffic and buys an inference pass nothing."""
    if not isinstance(module, torch.nn.Module):  # e.g. LCM-LoRA's teacher, the student with adapters off
        return None
    dtypes = {p.dtype for p in module.parameters()}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16} else None


def _cat_cond(cond: dict, uncond: dict) -> dict:
    """[cond; uncond] along the batch, for nested conditioning (SDXL's added_cond_kwargs) too."""
    return {k: _cat_cond(v, uncond[k]) if isinstance(v, dict) else torch.cat([v, uncond[k]]) for k, v in cond.items()}


@dataclass
class Step:
    """The parts of a distillation step; `loss(...)` is the method's loss for one micro-step."""

    student: torch.nn.Module  # f_θ, the online consistency model (a UNet with time_cond_proj_dim)
    target: torch.nn.Module  # f_θ⁻, EMA of the student
    teacher: Callable  # the frozen teacher's denoiser (a UNet; ε, v or x0 prediction)
    schedule: object  # the teacher's noise schedule, on the training device (lcm_exp.distill.schedules)
    solver: Callable  # Φ: solvers.ddim / euler / heun (conf/solver)
    skip: SkipSchedule
    guidance: object  # the ω sampler (conf/guidance): sample(n, device, generator)
    distance: Callable  # d(·,·): losses.l2 / huber, its constant c bound (conf/loss)
    w_embedding_dim: int = 256
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    teacher_dtype: torch.dtype = torch.float32
    batched_cfg: bool = False  # one teacher forward on [cond; uncond] instead of two
    teacher_first: bool = False  # the no-grad teacher/target passes before the online forward (same loss)
    method: object = None  # what the step computes (conf/method); None: latent consistency distillation
    auxiliary: dict = field(default_factory=dict)  # the method's other trained networks, by name (prepared)
    update: Callable | None = None  # update(name, loss): one optimiser step of an auxiliary network (the trainer's)

    def __post_init__(self):
        if self.method is None:
            from .methods.lcd import Distillation

            self.method = Distillation()

    def _frozen(self, net, z, t, cond, **kw):
        """A no-grad pass of the teacher or the target: natively in its own low precision when it has one."""
        dtype = native_dtype(net)
        if dtype is None:
            return net(z, t, **kw, **cond).sample.float()
        with torch.autocast(z.device.type, enabled=False):
            return net(z.to(dtype), t, **_cast(kw, dtype), **_cast(cond, dtype)).sample.float()

    def consistency_fn(self, unet, z, t, w_emb, cond, frozen: bool = False):
        """f(z, w, c, t) = c_skip(t) z + c_out(t) x̂0(z, t) (LCM eq. 3 with guidance w, eq. 7)."""
        c_skip, c_out = boundary_scalings(t, self.sigma_data, self.timestep_scaling)
        # w_emb None: a student without w input (LoRA)
        out = (self._frozen(unet, z, t, cond, timestep_cond=w_emb) if frozen
               else unet(z, t, timestep_cond=w_emb, **cond).sample)
        x0, _ = self.schedule.x0_and_eps(out, t, z)
        return _bcast(c_skip, z) * z + _bcast(c_out, z) * x0

    def guided_teacher(self, cond, uncond, w):
        """x̂ with classifier-free guidance in the LCM form (eq. 6), applied to both x0 and ε:
        x̂ = x̂_c + w (x̂_c − x̂_u)."""
        w = w.view(-1, 1, 1, 1)

        def denoise(z, t):
            zt = z.to(self.teacher_dtype)
            if self.batched_cfg:
                both = _cat_cond(cond, uncond)
                out_c, out_u = self._frozen(self.teacher, torch.cat([zt, zt]), torch.cat([t, t]), both).chunk(2)
            else:
                out_c = self._frozen(self.teacher, zt, t, cond)
                out_u = self._frozen(self.teacher, zt, t, uncond)
            x0_c, eps_c = self.schedule.x0_and_eps(out_c, t, z)
            x0_u, eps_u = self.schedule.x0_and_eps(out_u, t, z)
            return x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)

        return denoise

    def draw(self, latents: torch.Tensor, draws: Draws) -> "Draw":
        """The step's random draws, in Algorithm 1's order, each row from its own generator (`draws`)."""
        device = latents.device
        # Sample the pair (t_{n+k}, t_n) uniformly on the skipping-step DDIM grid t = (1..N)·k − 1 (§4.3).
        t, t_prev = (x.to(device) for x in draws.each(lambda g: self.skip.sample(1, g)))
        # ε ~ N(0, I) for z_{t_{n+k}} (eq. 1).
        noise = draws.randn(latents.shape[1:], device, latents.dtype)
        # ω ~ U[ω_min, ω_max] (§4.2).
        w = draws.each(lambda g: self.guidance.sample(1, "cpu", g)).to(device)
        return Draw(t, t_prev, noise, w)

    def noised(self, latents: torch.Tensor, draws: Draws) -> "Noised":
        """A step's draws and the noisy latents they make."""
        t, t_prev, noise, w = self.draw(latents, draws)
        # z_{t_{n+k}} = α z + σ ε (eq. 1).
        z_t = self.schedule.add_noise(latents, noise, t)
        # ω embedded as the student's timestep condition (§4.2).
        # (A student without a w input, LCM-LoRA, gets none: ω then acts only in the teacher's CFG.)
        w_emb = guidance_embedding(w, self.w_embedding_dim).to(latents.dtype) if self.w_embedding_dim else None
        return Noised(latents, noise, z_t, t, t_prev, w, w_emb)

    @torch.no_grad()
    def solver_step(self, x: "Noised", cond: dict, uncond: dict) -> torch.Tensor:
        """ẑ_{t_n}, the point one skipping step nearer the data than z_{t_{n+k}}: the method's (eq. 8 for LCD)."""
        return self.method.target_point(self, x, cond, uncond)

    @torch.no_grad()
    def target_fn(self, x: "Noised", z_prev: torch.Tensor, cond: dict) -> torch.Tensor:
        """The target f_θ⁻(ẑ_{t_n}, ω, c, t_n) with the EMA weights."""
        return self.consistency_fn(self.target, z_prev.to(x.latents.dtype), x.t_prev, x.w_emb, cond, frozen=True)

    def online(self, x: "Noised", cond: dict) -> torch.Tensor:
        """The online consistency function f_θ(z_{t_{n+k}}, ω, c, t_{n+k}) (eq. 7)."""
        return self.consistency_fn(self.student, x.z_t, x.t, x.w_emb, cond)

    def frozen(self, net, z, t, cond, **kw) -> torch.Tensor:
        """A no-grad pass of a frozen network (the teacher, the target), natively in its own low precision."""
        with torch.no_grad():
            return self._frozen(net, z, t, cond, **kw)

    def loss(self, latents: torch.Tensor, cond: dict, uncond: dict, draws: Draws) -> torch.Tensor:
        """The method's loss for one micro-step on encoded latents z = E(x) and text conditions c, its draws from
        `draws` (a mean over the batch). A method without its own `loss` (one written for lcm_exp < 0.2, with
        `target_point` only) gets latent consistency distillation's."""
        own = getattr(self.method, "loss", None)
        if own is None:
            from .methods.lcd import Distillation

            return Distillation.loss(self.method, self, latents, cond, uncond, draws)
        return own(self, latents, cond, uncond, draws)


class Noised(NamedTuple):
    """A step's inputs to the networks: the latents z, the draws, z_{t_{n+k}} and ω's embedding."""

    latents: torch.Tensor
    noise: torch.Tensor
    z_t: torch.Tensor
    t: torch.Tensor
    t_prev: torch.Tensor
    w: torch.Tensor
    w_emb: torch.Tensor | None


class Draw(NamedTuple):
    """The random draws of one LCD step, one row per sample: the timestep pair, the noise ε and the guidance ω."""

    t: torch.Tensor
    t_prev: torch.Tensor
    noise: torch.Tensor
    w: torch.Tensor
