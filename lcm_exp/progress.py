"""What a run shows while it trains: the logging window (the means since the last log line) and the progress bar."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass


@dataclass
class Window:
    """The losses and samples since the last log line (a checkpoint keeps it: a resumed run logs the same means)."""

    loss: float = 0.0
    n: int = 0
    samples: int = 0
    skipped: int = 0
    last: float = math.nan

    def __post_init__(self):
        self.t0 = time.perf_counter()

    def add(self, loss: float, samples: int, skipped: int) -> None:
        self.loss, self.n, self.samples, self.skipped = self.loss + loss, self.n + 1, self.samples + samples, \
            self.skipped + skipped
        self.last = loss

    def state(self) -> dict:
        return {"loss": self.loss, "n": self.n, "samples": self.samples, "skipped": self.skipped}



def logs_above(bar):
    """While a progress bar shows, log lines print above it instead of through it."""
    if bar is None:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def progress_bar(enabled, step: int, total: int):
    """A tqdm bar on a terminal (trainer.progress_bar=auto), none in a log file; true forces it, false hides it."""
    if enabled == "auto":
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc="lcm-exp", unit="step", dynamic_ncols=True)
