"""The skip-step discretisation: DDIM grid t = (1..N)·k − 1, N = T // k (LCM paper §4.3)."""
from __future__ import annotations

import torch

from ..config import ConfigError


class SkipSchedule:
    """Draws the pair (t_{n+k}, t_n) of the consistency condition (LCM paper eq. 8, skipping k steps)."""

    def __init__(self, k: int, num_train_timesteps: int | None = None):
        """`k` from `conf/skip/`; the grid needs the teacher's T (`num_train_timesteps`, or `for_teacher`)."""
        if k < 1:
            raise ConfigError(f"Invalid value for skip.k: {k}. Expected an integer >= 1 (the LCM default is 20), "
                              "e.g. `lcm-exp skip.k=20`.")
        self.k = int(k)
        if num_train_timesteps is None:
            return
        if k > num_train_timesteps:
            raise ConfigError(f"Invalid value for skip.k: {k} is more than the teacher's {num_train_timesteps} "
                              f"training timesteps. Expected 1 <= skip.k <= {num_train_timesteps} (the LCM default "
                              "is 20), e.g. `lcm-exp skip.k=20`.")
        self.num_steps = num_train_timesteps // self.k  # N
        self.timesteps = torch.arange(1, self.num_steps + 1) * self.k - 1  # t_1 .. t_N

    def for_teacher(self, num_train_timesteps: int) -> "SkipSchedule":
        """The grid on a teacher's T training timesteps."""
        return SkipSchedule(self.k, num_train_timesteps)

    def sample(self, n: int, generator: torch.Generator | None = None):
        """Returns (t_start, t_end) = (t_{n+k}, max(t_{n+k} − k, 0)), each of shape (n,)."""
        index = torch.randint(0, self.num_steps, (n,), generator=generator)
        t_start = self.timesteps[index]
        return t_start, (t_start - self.k).clamp(min=0)
