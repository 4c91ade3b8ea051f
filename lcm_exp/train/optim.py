"""Optimiser builders, one per option of `conf/optim/`; each shares the signature
`build(params, **optim_cfg) -> Optimisation`: the optimiser, its lr schedule and the gradient clipping.

The lr schedule (`optim.lr_scheduler`, `optim.lr_warmup_steps`) is diffusers' `get_scheduler`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler

from ..config import invalid


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    lr_scheduler: str  # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int
    max_grad_norm: float

    def schedule(self, max_steps: int):
        """The lr schedule over `max_steps` optimiser steps, stepped once per optimiser step whatever the number of
        processes (the trainer steps it; a checkpoint keeps its position in optimiser steps)."""
        return get_scheduler(self.lr_scheduler, optimizer=self.optimizer, num_warmup_steps=self.lr_warmup_steps,
                             num_training_steps=max(max_steps, 1))


def adamw(params, lr: float, weight_decay: float, betas: list, eps: float, fused: bool | None, lr_scheduler: str,
          lr_warmup_steps: int, max_grad_norm: float) -> Optimisation:
    """torch AdamW; fused (one kernel for all parameters) wherever torch has the fused kernel for the parameters'
    device and dtype -- CUDA and, since torch 2.4, the CPU -- foreach elsewhere."""
    _check(lr)
    params = list(params)
    fused = _fused_supported(params) if fused is None else fused
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                            fused=fused or None, foreach=None if fused else True)
    return Optimisation(opt, lr_scheduler, lr_warmup_steps, max_grad_norm)


def adamw8bit(params, lr: float, weight_decay: float, betas: list, eps: float, fused: bool | None, lr_scheduler: str,
              lr_warmup_steps: int, max_grad_norm: float) -> Optimisation:
    """bitsandbytes' 8-bit AdamW: optimiser states in 8 bits (about a quarter of AdamW's memory). Its YAML takes
    adamw's keys; `fused` does not apply (bitsandbytes has its own kernels)."""
    _check(lr)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("optim=adamw8bit needs bitsandbytes: `pip install -e '.[gpu]'` (or bitsandbytes), or use "
                          "optim=adamw") from e
    opt = bnb.optim.AdamW8bit(list(params), lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
    return Optimisation(opt, lr_scheduler, lr_warmup_steps, max_grad_norm)


def _check(lr: float) -> None:
    if lr <= 0:
        raise invalid("optim.lr", lr, "> 0")


def _fused_supported(params) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # an older torch: CUDA only
        devices = {"cuda"}
    return len(params) > 0 and all(p.device.type in devices and p.is_floating_point() for p in params)


def load_lr_schedule(scheduler, state: dict) -> None:
    """The lr schedule's position from a checkpoint, counted in optimiser steps, and the optimiser's lr set from
    this run's schedule at that position (a run resumed with another `trainer.max_steps` follows its new schedule
    from there; the optimiser state saved the old one's lr). A checkpoint of lcm_exp < 0.2 kept the position in
    accelerate's `scheduler.bin`, counted once per rank per step."""
    saved = state.get("lr_schedule")
    old = Path(state["path"]) / "scheduler.bin"
    if saved is None and old.exists():
        saved = torch.load(old, weights_only=False)
        saved["last_epoch"] //= int(state.get("world_size", 1))
        saved["_step_count"] = saved["last_epoch"] + 1
    if saved is None:
        return
    position = int(saved["last_epoch"])
    scheduler.load_state_dict(saved)
    scheduler.last_epoch = position - 1
    scheduler.step()  # (recomputes the lr at `position` and sets it in the optimiser)
