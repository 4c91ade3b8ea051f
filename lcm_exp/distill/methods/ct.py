"""`method=ct`: consistency training (Song et al. 2023, CM §5): no teacher denoising."""
from __future__ import annotations

import torch

from ...config import ConfigError
from .lcd import Distillation


class ConsistencyTraining(Distillation):
    """LCD's step with the unbiased single-sample estimate of the target point, ẑ_{t_n} = α_{t_n} z + σ_{t_n} ε with
    the same ε as z_{t_{n+k}}. The teacher still encodes images and prompts. `from_scratch`: the student starts
    from random weights instead of the teacher's."""

    def __init__(self, from_scratch: bool):
        self.from_scratch = bool(from_scratch)

    def init_student(self, student) -> None:
        if not self.from_scratch:
            return
        if student.teacher_unet is not None:
            raise ConfigError("method.from_scratch=true needs a student with its own network: "
                              f"student={student.kind} adapts the teacher's weights (use student=full)")
        reinitialise(student.unet)

    def target_point(self, step, x, cond: dict, uncond: dict) -> torch.Tensor:
        return step.schedule.add_noise(x.latents, x.noise, x.t_prev)


def reinitialise(unet: torch.nn.Module) -> None:
    """Random weights of the same architecture (diffusers' initialisation), in place."""
    from diffusers import UNet2DConditionModel

    unet.load_state_dict(UNet2DConditionModel.from_config(unet.config).state_dict())
