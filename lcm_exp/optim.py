"""Optimiser builders, one per option of `conf/optim/`; each shares the signature `build(params, **optim_cfg)`.

The lr schedule (`optim.lr_scheduler`, `optim.lr_warmup_steps`) is diffusers' `get_scheduler`.
"""
from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler


def adamw(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None,
          **_) -> torch.optim.Optimizer:
    """torch AdamW; fused (one kernel for all parameters) wherever torch has the fused kernel for the parameters'
    device and dtype -- CUDA and, since torch 2.4, the CPU -- foreach elsewhere."""
    params = list(params)
    fused = _fused_supported(params) if fused is None else fused
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                             fused=fused or None, foreach=None if fused else True)


def _fused_supported(params) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # an older torch: CUDA only
        devices = {"cuda"}
    return len(params) > 0 and all(p.device.type in devices and p.is_floating_point() for p in params)


def adamw8bit(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, **_):
    """bitsandbytes' 8-bit AdamW: optimiser states in 8 bits (about a quarter of AdamW's memory)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("optim=adamw8bit needs bitsandbytes: `pip install bitsandbytes`, or use optim=adamw") from e
    return bnb.optim.AdamW8bit(list(params), lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def lr_schedule(optimizer, name: str, warmup_steps: int, max_steps: int):
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(max_steps, 1))
