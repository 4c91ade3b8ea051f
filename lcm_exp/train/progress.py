"""What a run shows while it trains: the logging window (the means since the last log line) and the progress bar."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import torch


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

    def means(self, acc, lr: float, grad_norm, accumulation: int) -> dict:
        """The window's means over every rank (a collective with several): the `train/...` metrics."""
        totals = torch.tensor([self.loss, self.n, self.samples, self.skipped], dtype=torch.float64)
        if acc.num_processes > 1:
            totals = acc.reduce(totals.to(acc.device), "sum").cpu()
        loss, n, samples, skipped = totals.tolist()
        dt = time.perf_counter() - self.t0
        stats = {"train/loss": loss / max(n, 1), "train/lr": lr,
                 "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                 "train/samples_per_s": samples / dt,
                 "train/step_time_ms": 1000 * dt / max(1, self.n // accumulation), "data/skipped": skipped}
        if acc.device.type == "cuda":
            stats["train/peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return stats


def logs_above(bar):
    """While a progress bar shows, log lines print above it instead of through it."""
    if bar is None:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def progress_bar(setting, main_process: bool, step: int, total: int):
    """A tqdm bar on rank 0: on a terminal (`trainer.progress_bar=auto`), none when stderr goes to a file (a cluster
    job's log); true forces it, false hides it."""
    enabled = sys.stderr.isatty() if setting == "auto" else bool(setting)
    if not (enabled and main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc="lcm-exp", unit="step", dynamic_ncols=True)
