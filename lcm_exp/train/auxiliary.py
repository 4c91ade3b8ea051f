"""A method's auxiliary networks (DMD2's fake score): prepared by accelerate like the student (devices, DDP,
checkpointing), each with its own optimiser, which the method steps through `Step.update(name, loss)`: backward,
clip, optimiser step, zero. Their optimisers (and, under fp16, their own grad scalers) are checkpointed with the
run, so a resume continues them exactly. They train outside the student's gradient accumulation: every update is
a whole optimiser step of its own."""
from __future__ import annotations

import torch

from ..config import ConfigError


class AuxiliaryNetworks:
    """`auxiliary`: {name: lcm_exp.distill.methods.Auxiliary} of the method; `acc`: the run's Accelerator."""

    def __init__(self, acc, auxiliary: dict, sharded: bool):
        if auxiliary and sharded:
            raise ConfigError(f"trainer.strategy=fsdp is not supported with this method's auxiliary networks "
                              f"({', '.join(auxiliary)}): use trainer.strategy=ddp.")
        self.acc, self.modules, self.optimizers, self.clip, self.scalers = acc, {}, {}, {}, {}
        for name, aux in auxiliary.items():
            module = acc.prepare(aux.module.to(acc.device).float().train().requires_grad_(True))
            optimizer = aux.optimizer([p for p in module.parameters() if p.requires_grad])
            acc.register_for_checkpointing(optimizer)  # (stepped here, not through accelerate's wrapper, which
            self.modules[name], self.optimizers[name], self.clip[name] = module, optimizer, aux.max_grad_norm
            if acc.mixed_precision == "fp16":  # skips steps while the student accumulates gradients)
                self.scalers[name] = torch.amp.GradScaler(acc.device.type)
                acc.register_for_checkpointing(self.scalers[name])

    def update(self, name: str, loss: torch.Tensor) -> float:
        """One optimiser step of network `name` on `loss`; returns its gradient norm."""
        module, optimizer, scaler = self.modules[name], self.optimizers[name], self.scalers.get(name)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)  # (a student's loss may have reached it since its last update)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip[name])
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)
