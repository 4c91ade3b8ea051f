"""A teacher family of the user's own, outside lcm_exp: rectified flow (flow matching), z_s = (1 − s) x0 + s ε with
s = (t + 1) / T on the integer timesteps t = 0..T−1, the network predicting the velocity v = ε − x0.

What a family provides: its noise schedule (for the LCD step, the methods and the DDIM solver), the sampler of
its students (the multistep consistency sampler in its own schedule) and its own sampler for the evaluation's
teacher baselines, as diffusers schedulers, so that validation, evaluation and the export sample with them.
The networks here are the tiny random SD-shaped ones (`lcm_exp.teachers.tiny_random`): any denoiser with the
UNet's call signature would do. `tests/test_extension.py` trains, validates, exports and evaluates with it."""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from lcm_exp.distill.step import boundary_scalings
from lcm_exp.distill.schedules import bcast
from lcm_exp.teachers import Teacher
from lcm_exp.teachers.tiny_random import load


def _s(t, num_train_timesteps: int) -> torch.Tensor:
    """The noise level s of integer timesteps t."""
    return (torch.as_tensor(t).double() + 1) / num_train_timesteps


class FlowSchedule:
    """The family's schedule in lcm_exp's interface (`lcm_exp.distill.schedules`): α = 1 − s, σ = s, velocity output."""

    def __init__(self, num_train_timesteps: int):
        self.num_train_timesteps = num_train_timesteps

    def to(self, device) -> "FlowSchedule":
        return self

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor):
        s = _s(t, self.num_train_timesteps).to(like.device)
        return bcast(1 - s, like), bcast(s, like)

    def add_noise(self, x0, eps, t):
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps

    def x0_and_eps(self, v, t, z):
        alpha, sigma = self.alpha_sigma(t, z)
        return z - sigma * v, z + alpha * v


class _FlowScheduler(SchedulerMixin, ConfigMixin):
    order = 1
    init_noise_sigma = 1.0

    def scale_model_input(self, sample, timestep=None):
        return sample

    def _after(self, timestep) -> int | None:
        """The timestep after `timestep` in this sampling, None at the last."""
        i = int((self.timesteps == int(timestep)).nonzero()[0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else None


class FlowConsistencyScheduler(_FlowScheduler):
    """Multistep consistency sampling (CM Alg. 1, as LCMScheduler does for VP): at each grid timestep the
    student's f(z, t) = c_skip z + c_out x̂0, then noised again to the next timestep along the flow."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, original_inference_steps: int = 50,
                 timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        self.timesteps = torch.zeros(0, dtype=torch.long)

    def set_timesteps(self, num_inference_steps: int, device=None, **_):
        c = self.config
        k = c.num_train_timesteps // c.original_inference_steps
        grid = (torch.arange(1, c.original_inference_steps + 1) * k - 1).flip(0)  # the training grid, noisiest first
        self.timesteps = grid[::max(1, len(grid) // num_inference_steps)][:num_inference_steps].to(device)
        self.num_inference_steps = len(self.timesteps)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        c, t = self.config, torch.as_tensor([int(timestep)])
        s = _s(t, c.num_train_timesteps).item()
        c_skip, c_out = (x.item() for x in boundary_scalings(t, c.sigma_data, c.timestep_scaling))
        denoised = c_skip * sample + c_out * (sample - s * model_output)
        after = self._after(timestep)
        if after is None:
            prev = denoised
        else:
            s_next = _s(after, c.num_train_timesteps).item()
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = (1 - s_next) * denoised + s_next * noise
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised) if return_dict else (prev, denoised)


class FlowDDIMScheduler(_FlowScheduler):
    """The teacher's own sampler: deterministic DDIM, z' = α' x̂0 + σ' ε̂, which on this schedule is Euler's
    step along the velocity, z' = z + (s' − s) v; ends at s = 0."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000):
        self.timesteps = torch.zeros(0, dtype=torch.long)

    def set_timesteps(self, num_inference_steps: int, device=None, **_):
        T = self.config.num_train_timesteps
        self.timesteps = torch.linspace(T - 1, 0, num_inference_steps).round().long().to(device)
        self.num_inference_steps = num_inference_steps

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **_):
        T = self.config.num_train_timesteps
        after = self._after(timestep)
        s, s_next = _s(int(timestep), T).item(), (0.0 if after is None else _s(after, T).item())
        prev = sample + (s_next - s) * model_output
        return LCMSchedulerOutput(prev_sample=prev, denoised=sample - s * model_output) if return_dict else (prev,)


class FlowTeacher(Teacher):
    """The family: lcm_exp's Teacher (encode, condition, denoiser) with the flow schedule and its samplers."""

    solvers = ("ddim",)  # (DDIM, the evaluation's reference, is required; DPM-Solver++ this family has not)

    @property
    def schedule(self):
        return FlowSchedule(self.num_train_timesteps)

    def consistency_scheduler(self, num_steps: int, timestep_scaling: float):
        return FlowConsistencyScheduler(self.num_train_timesteps, num_steps, timestep_scaling)

    def solver_scheduler(self, solver: str, **_):
        if solver != "ddim":
            raise ValueError(f"the flow family has no sampler {solver!r}")
        return FlowDDIMScheduler(self.num_train_timesteps)


def flow_teacher(name: str, cache_dir: str, arch: dict, cast_to_mixed_precision: bool) -> FlowTeacher:
    """`conf/teacher/flow.yaml`'s target: the tiny random networks as a flow-matching teacher."""
    base = load(name, None, cache_dir, arch, False, cast_to_mixed_precision)
    return FlowTeacher(**{f: getattr(base, f) for f in base.__dataclass_fields__})
