"""Noise schedules of teacher families: the forward process z_t = α_t x0 + σ_t ε and the inversion of a model's
output, on the teacher's integer training timesteps t. The LCD step, the methods and the solvers use only this.

`VPSchedule` is the DDPM schedule of Stable Diffusion 1.x/2.x/XL (α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)), with ε, v or
x0 prediction. A teacher family with another schedule (flow matching: α_t = 1 − t, σ_t = t, velocity
prediction) provides a class with the same methods.
"""
from __future__ import annotations

import torch


def bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) tensor shaped to broadcast against `like` (B, ...), in its dtype."""
    return x.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def x0_and_eps(model_output: torch.Tensor, t: torch.Tensor, z_t: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str):
    """Inverts z_t = √ᾱ x0 + √(1−ᾱ) ε (the forward process, LCM eq. 1) for the model's parameterisation."""
    a = bcast(alphas_cumprod[t], z_t)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (z_t - s1a * eps) / sa
    elif prediction_type == "v_prediction":  # v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022)
        x0 = sa * z_t - s1a * model_output
        eps = sa * model_output + s1a * z_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (z_t - sa * x0) / s1a
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


class VPSchedule:
    """The variance-preserving DDPM schedule given by its ᾱ table (a diffusers scheduler's `alphas_cumprod`)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def to(self, device) -> "VPSchedule":
        return VPSchedule(self.alphas_cumprod.to(device), self.prediction_type)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor):
        """(α_t, σ_t), shaped and typed to broadcast against `like`."""
        a = bcast(self.alphas_cumprod[t], like)
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = α_t x0 + σ_t ε (LCM eq. 1)."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps

    def x0_and_eps(self, model_output: torch.Tensor, t: torch.Tensor, z_t: torch.Tensor):
        """(x̂0, ε̂) from the model's output at (z_t, t)."""
        return x0_and_eps(model_output, t, z_t, self.alphas_cumprod, self.prediction_type)

    def model_output(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a network of this parameterisation outputs at z_t = α_t x0 + σ_t ε: ε, v = α_t ε − σ_t x0, or x0
        (the denoising target a copy of the teacher trains on)."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            alpha, sigma = self.alpha_sigma(t, x0)
            return alpha * eps - sigma * x0
        return x0
