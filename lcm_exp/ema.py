"""The target network f_θ⁻: an exponential moving average of the online student (LCM paper Alg. 1)."""
from __future__ import annotations

import copy

import torch


class EMA:
    """θ⁻ ← μ θ⁻ + (1 − μ) θ, over the trainable parameters; the rest of the target is the online's copy."""

    def __init__(self, online: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.target = copy.deepcopy(online).requires_grad_(False).eval()
        names = {n for n, p in online.named_parameters() if p.requires_grad}
        self._pairs = [(tp, op) for (n, tp), (_, op) in zip(self.target.named_parameters(), online.named_parameters())
                       if n in names]

    @torch.no_grad()
    def update(self) -> None:
        if not self._pairs:
            return
        target, online = zip(*self._pairs)
        torch._foreach_lerp_(list(target), [o.detach().to(t.dtype) for t, o in zip(target, online)], 1.0 - self.decay)

    def state_dict(self):
        return self.target.state_dict()

    def load_state_dict(self, state):
        self.target.load_state_dict(state)


class OnlineTarget:
    """No EMA: the target f_θ⁻ is the online student itself, called under no_grad (the diffusers LCM-LoRA
    scripts' choice; `student.ema_target=false`)."""

    decay = 0.0

    def __init__(self, online: torch.nn.Module):
        self.target = online

    def update(self) -> None:
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
