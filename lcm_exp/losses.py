"""Consistency distillation losses d(f_online, f_target) (LCM paper eq. 8). Every loss shares one signature."""
from __future__ import annotations

import torch


def l2(pred: torch.Tensor, target: torch.Tensor, **_) -> torch.Tensor:
    """Mean squared error. Other losses' keys (`huber_c`) are accepted and unused, so that every loss shares one
    call; `**_` also tells the tracker they do not apply to this loss (`lcm_exp.applicability`)."""
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")


def huber(pred: torch.Tensor, target: torch.Tensor, huber_c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber loss mean(sqrt(d^2 + c^2) - c) (Song & Dhariwal 2023, "Improved CT", eq. 13)."""
    d = pred.float() - target.float()
    return torch.mean(torch.sqrt(d * d + huber_c * huber_c) - huber_c)
