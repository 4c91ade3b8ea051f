"""Consistency distillation losses d(f_online, f_target) (LCM paper eq. 8). Every loss shares one signature,
`loss(pred, target, **its config keys) -> scalar` (`conf/loss/<name>.yaml` binds the keys: `_partial_: true`)."""
from __future__ import annotations

import torch


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")


def huber(pred: torch.Tensor, target: torch.Tensor, huber_c: float) -> torch.Tensor:
    """Pseudo-Huber loss mean(sqrt(d^2 + c^2) - c) (Song & Dhariwal 2023, "Improved CT", eq. 13)."""
    if huber_c <= 0:
        from ..config import invalid

        raise invalid("loss.huber_c", huber_c, "> 0")
    d = pred.float() - target.float()
    return torch.mean(torch.sqrt(d * d + huber_c * huber_c) - huber_c)
