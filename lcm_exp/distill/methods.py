"""Methods (`conf/method/`): where the consistency target is taken, ẑ_{t_n}, the point one skipping step nearer
the data than z_{t_{n+k}}. Every method shares one interface:

    method.target_point(step, x, cond, uncond) -> ẑ_{t_n}     (`step`: the LCD step, `x`: its `Noised` draws)
    method.uses_teacher                                        (whether target_point calls the teacher's UNet)
    method.init_student(student)                               (before training: e.g. random weights)

A new method is a class with these three (in any module), named as `method._target_`.
"""
from __future__ import annotations

import torch

from ..config import ConfigError


class Distillation:
    """Latent consistency distillation (LCM Alg. 1): the teacher's guided solver step,
    ẑ_{t_n} = z_{t_{n+k}} + (1 + ω) Φ(z_{t_{n+k}}, t_{n+k}, t_n, c) − ω Φ(z_{t_{n+k}}, t_{n+k}, t_n, ∅) (eq. 8)."""

    uses_teacher = True

    def init_student(self, student) -> None:
        pass

    def target_point(self, step, x, cond: dict, uncond: dict) -> torch.Tensor:
        return step.solver(step.guided_teacher(cond, uncond, x.w), x.z_t, x.t, x.t_prev, step.schedule)


class ConsistencyTraining:
    """Consistency training (Song et al. 2023, CM §5): no teacher denoising; the unbiased single-sample estimate
    ẑ_{t_n} = α_{t_n} z + σ_{t_n} ε with the same ε as z_{t_{n+k}}. The teacher still encodes images and
    prompts. `from_scratch`: the student starts from random weights instead of the teacher's."""

    uses_teacher = False

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
