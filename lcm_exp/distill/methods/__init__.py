"""Methods (`conf/method/`): what one training step of a few-step distillation method computes, which networks it
trains, and how its students sample. A method is one class (in any module, named as `method._target_`):

    method.loss(step, latents, cond, uncond, draws) -> loss   the student's loss for one micro-step (`step`: the
                                                             `lcm_exp.distill.step.Step`, its networks and math)
    method.init_student(student)                              before training (e.g. random weights)
    method.auxiliary(teacher, student) -> {name: Auxiliary}   other networks it trains, each with its optimiser
                                                             (DMD2's fake score); `step.update(name, loss)` steps one
    method.sampling(teacher, grid_steps, timestep_scaling)    its students' sampler (`Sampling`): validation,
                                                             evaluation, the export and the registered model use it

`Method` gives the defaults (no auxiliary network, the teacher's consistency sampler). The trainer prepares
auxiliary networks like the student (DDP, mixed precision) and checkpoints them and their optimisers, so a
resume continues them exactly. Latent consistency distillation (`lcd`), consistency training (`ct`),
trajectory consistency distillation (`tcd`), phased consistency (`pcm`) and distribution matching (`dmd2`) are
methods of this one interface.
"""
from .base import Auxiliary, Method, Sampling
from .ct import ConsistencyTraining
from .lcd import Distillation

__all__ = ["Auxiliary", "ConsistencyTraining", "Distillation", "Method", "Sampling"]
