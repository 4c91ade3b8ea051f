"""Optimiser builders, one per option of `conf/optim/`; each shares the signature `build(params, **optim_cfg)`.

The lr schedule (`optim.lr_scheduler`, `optim.lr_warmup_steps`) is diffusers' `get_scheduler`.
"""
from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler


def adamw(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None,
          **_) -> torch.optim.Optimizer:
    """torch AdamW; fused on CUDA (one kernel for all parameters), foreach elsewhere."""
    params = list(params)
    on_cuda = all(p.is_cuda for p in params) and len(params) > 0
    fused = on_cuda if fused is None else fused
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                             fused=fused or None, foreach=None if fused else True)


def adamw8bit(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, **_):
    """bitsandbytes' 8-bit AdamW: optimiser states in 8 bits (about a quarter of AdamW's memory)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("optim=adamw8bit needs bitsandbytes: `pip install bitsandbytes`, or use optim=adamw") from e
    return bnb.optim.AdamW8bit(list(params), lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def lr_schedule(optimizer, name: str, warmup_steps: int, max_steps: int):
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(max_steps, 1))
