"""The target network f_θ⁻: an exponential moving average of the online student (LCM paper Alg. 1)."""
from __future__ import annotations

import copy

import torch


class EMA:
    """θ⁻ ← μ θ⁻ + (1 − μ) θ over the trainable parameters, kept in fp32.

    With `dtype` (the mixed-precision dtype, `ema.cast_to_mixed_precision`) the network that runs the target's
    forward pass holds a bf16/fp16 copy of θ⁻, refreshed after each update: no per-op weight casts under
    autocast, half the memory traffic, and the average itself loses no precision."""

    sharded = False  # FSDP: the target is a prepared model, checkpointed by accelerate (not through state_dict)

    def __init__(self, online: torch.nn.Module, decay: float, cast_to_mixed_precision: bool,
                 dtype: torch.dtype | None = None):
        if not 0.0 <= decay <= 1.0:
            from ..config import invalid

            raise invalid("ema.decay", decay, "a number in [0, 1]")
        self.decay = float(decay)
        self.target = copy.deepcopy(online).requires_grad_(False).eval()
        names = {n for n, p in online.named_parameters() if p.requires_grad}
        pairs = [(n, tp, op) for (n, tp), (_, op) in zip(self.target.named_parameters(), online.named_parameters())
                 if n in names]
        self._names = [n for n, _, _ in pairs]
        pairs = [(tp, op) for _, tp, op in pairs]
        self._target_params = [tp for tp, _ in pairs]
        self._online_params = [op for _, op in pairs]
        self._master = self._target_params
        if dtype is not None and dtype != torch.float32 and cast_to_mixed_precision:
            self._master = [p.detach().float().clone() for p in self._target_params]
            torch.nn.Module.to(self.target, dtype)  # (diffusers' own `to` warns of fp32 modules it has none of)

    def shard(self, prepare, online: torch.nn.Module) -> None:
        """FSDP (`trainer.strategy=fsdp`): the target sharded as the online network is (`prepare`: accelerate's),
        its fp32 parameters the average itself, updated shard by shard on each rank with no communication (FSDP's
        mixed-precision policy casts the gathered weights for the forward pass). `online`: the sharded student."""
        with torch.no_grad():
            if self._master is not self._target_params:  # back to fp32, from the fp32 average
                torch.nn.Module.float(self.target)
                torch._foreach_copy_(self._target_params, self._master)
        self.target = prepare(self.target)
        params = dict(self.target.named_parameters())
        online_params = dict(online.named_parameters())
        self._target_params = [params[n] for n in self._names]
        self._online_params = [online_params[n] for n in self._names]
        self._master = self._target_params
        self.sharded = True

    @torch.no_grad()
    def update(self) -> None:
        if not self._master:
            return
        online = [p.detach() for p in self._online_params]
        if online[0].dtype != self._master[0].dtype:
            online = [p.to(self._master[0].dtype) for p in online]
        torch._foreach_lerp_(self._master, online, 1.0 - self.decay)
        if self._master is not self._target_params:
            torch._foreach_copy_(self._target_params, self._master)

    def averaged(self) -> torch.nn.Module:
        """The target network with the averaged weights in fp32: the fp32 master itself, not the low-precision
        copy that runs the target's forward pass under mixed precision (what is saved and exported)."""
        if self._master is self._target_params:
            return self.target
        net = copy.deepcopy(self.target).float()
        with torch.no_grad():
            for name, master in zip(self._names, self._master):
                net.get_parameter(name).copy_(master)
        return net

    def owned_tensors(self) -> list[torch.Tensor]:
        """The tensors the EMA holds beyond the online network: the target (and its fp32 master, if separate)."""
        extra = list(self._master) if self._master is not self._target_params else []
        return list(self.target.parameters()) + extra

    def load_averaged(self, state: dict) -> None:
        """The average from a target network's state dict (an FSDP checkpoint's sharded target, gathered)."""
        self.load_state_dict({"master": [state[n] for n in self._names]})

    def state_dict(self):
        """The fp32 average (the tensors themselves: a checkpoint serialises them at once, with no copy of the
        network in memory)."""
        if self.sharded:
            return {}
        return {"master": [p.detach() for p in self._master]}

    def load_state_dict(self, state):
        if self.sharded:
            return
        with torch.no_grad():
            torch._foreach_copy_(self._master, [p.to(self._master[0].device) for p in state["master"]])
            if self._master is not self._target_params:
                torch._foreach_copy_(self._target_params, self._master)



class OnlineTarget:
    """No EMA: the target f_θ⁻ is the online student itself, called under no_grad (the diffusers LCM-LoRA
    scripts' choice; `student.ema_target=false`)."""

    decay = 0.0

    def __init__(self, online: torch.nn.Module):
        self.target = online

    def update(self) -> None:
        pass

    def averaged(self) -> torch.nn.Module:
        return self.target

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
