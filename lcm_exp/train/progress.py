"""What a run shows while it trains: the logging window (the means since the last log line) and the progress bar."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("lcm_exp.train.trainer")  # (the step lines come from the trainer, as before)


@dataclass
class Window:
    """The losses and samples since the last log line (a checkpoint keeps it: a resumed run logs the same means)."""

    loss: float = 0.0
    n: int = 0
    samples: int = 0
    skipped: int = 0
    last: float = math.nan
    read_mb: float = 0.0  # shard MB this rank's processes have read since the run (re)started

    def __post_init__(self):
        self.t0 = time.perf_counter()

    def add(self, loss: float, batch: dict) -> None:
        self.loss, self.n, self.samples = self.loss + loss, self.n + 1, self.samples + len(batch["captions"])
        self.skipped += batch.get("n_skipped", 0)
        self.read_mb = batch.get("read_mb", self.read_mb)
        self.last = loss

    def state(self) -> dict:
        return {"loss": self.loss, "n": self.n, "samples": self.samples, "skipped": self.skipped}

    def means(self, acc, lr: float, grad_norm, accumulation: int) -> dict:
        """The window's means over every rank (a collective with several): the `train/...` metrics."""
        totals = torch.tensor([self.loss, self.n, self.samples, self.skipped, self.read_mb], dtype=torch.float64)
        if acc.num_processes > 1:
            totals = acc.reduce(totals.to(acc.device), "sum").cpu()
        loss, n, samples, skipped, read_mb = totals.tolist()
        dt = time.perf_counter() - self.t0
        stats = {"train/loss": loss / max(n, 1), "train/lr": lr,
                 "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                 "train/samples_per_s": samples / dt,
                 "train/step_time_ms": 1000 * dt / max(1, self.n // accumulation), "data/skipped": skipped,
                 "data/read_mb": read_mb}
        if acc.device.type == "cuda":
            stats["train/peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return stats


def report(window: Window, acc, tracker, step: int, max_steps: int, lr: float, grad_norm, accumulation: int,
           on_log=None) -> dict:
    """The window's means over every rank (a collective), logged to MLflow and the log by rank 0; `on_log(step,
    stats)` on every rank. Returns the means."""
    stats = window.means(acc, lr, grad_norm, accumulation)
    if acc.is_main_process:
        tracker.log_metrics(stats, step)
        log.info("step %d/%d loss %.5f lr %.2e", step, max_steps, stats["train/loss"], stats["train/lr"])
    if on_log:
        on_log(step, stats)
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
