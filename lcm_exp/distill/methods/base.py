"""The method interface (`lcm_exp.distill.methods` says what each part is for)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Auxiliary:
    """A network a method trains beside the student, with its optimiser (`optimizer(params)`) and clipping."""

    module: torch.nn.Module
    optimizer: Callable[[list], torch.optim.Optimizer]
    max_grad_norm: float = 1.0


@dataclass
class Sampling:
    """How a method's students sample: a diffusers scheduler, the pipeline arguments for n steps beyond
    `num_inference_steps` (`kwargs(n)`: e.g. TCD's `eta`, explicit `timesteps`), and whether the student needs a
    pipeline that passes them (`plain`: the teacher family's own pipeline, which takes `eta` and `timesteps` and
    feeds the w embedding, instead of `LatentConsistencyModelPipeline`)."""

    scheduler: object
    arguments: Callable[[int], dict] = field(default=lambda n: {})
    plain: bool = False

    def kwargs(self, steps: int) -> dict:
        return dict(self.arguments(int(steps)))


class Method:
    """The defaults of the method interface (see the module docstring)."""

    def init_student(self, student) -> None:
        pass

    def auxiliary(self, teacher, student) -> dict[str, Auxiliary]:
        return {}

    def sampling(self, teacher, grid_steps: int, timestep_scaling: float) -> Sampling:
        """LCM's multistep consistency sampler on the training's skip-step grid (`grid_steps` = N = T // k)."""
        return Sampling(teacher.consistency_scheduler(grid_steps, timestep_scaling))


def vp_scheduler(name: str, teacher, what: str, **settings):
    """diffusers' scheduler `name` (TCDScheduler, LCMScheduler, ...) on a VP (DDPM) teacher's schedule, with
    `settings`; the keys of the teacher's scheduler config it does not take are left out (no warning). A teacher
    of another family (flow matching) has no such sampler: `what` is refused with a message."""
    import inspect

    import diffusers

    from ...config import ConfigError

    if getattr(teacher.scheduler, "alphas_cumprod", None) is None:
        raise ConfigError(f"{what} samples with diffusers' {name}, written for a VP (DDPM) teacher; teacher "
                          f"{teacher.name} has a {type(teacher.scheduler).__name__}. Use method=lcd with it.")
    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in teacher.scheduler.config.items() if k in accepted}
    return cls.from_config({**config, "clip_sample": False}, **settings)
