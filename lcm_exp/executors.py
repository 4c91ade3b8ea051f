"""Step executors: how one micro-step's LCD loss is computed, behind one seam (`loss(batch, generator, upcoming)`).

- `Sequential`: `LCD.loss` on the calling thread; every device, every student.
- `Overlapped` (`trainer.overlap_frozen`, CPU only): the frozen networks' passes on a second thread. Of a step's
  four UNet passes only the student's forward and backward lie between two optimiser steps: the target f_θ⁻ runs
  beside the student's forward, and the *next* micro-step's conditioning, draws and teacher solver step beside
  this one's backward. Each stream gets half the OpenMP threads. The numbers are the sequential step's: every
  draw comes from the micro-step's own generator, and the worker never reads what the main thread writes.

Deleting `Overlapped` means deleting its class, `FrozenThread` and the `trainer.overlap_frozen` option.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Callable

import torch

log = logging.getLogger(__name__)


def use_threads(n: int) -> None:
    """The calling thread's OpenMP threads (torch.set_num_threads), set only when they change."""
    if torch.get_num_threads() != n:  # (setting it clears oneDNN's primitive cache: only when it changes)
        torch.set_num_threads(n)


class Sequential:
    """The LCD loss on the calling thread. `condition(batch, generator)` -> (latents, cond, uncond)."""

    def __init__(self, lcd, condition: Callable):
        self.lcd, self.condition = lcd, condition
        self.threads = torch.get_num_threads()  # the caller's OpenMP threads while a step runs

    def loss(self, batch: dict, generator: torch.Generator, upcoming=None) -> torch.Tensor:
        latents, cond, uncond = self.condition(batch, generator)
        return self.lcd.loss(latents, cond, uncond, generator)

    def pause(self) -> None:
        """Between steps (validation, checkpoints): nothing of the executor's running, the threads as they were."""

    def close(self) -> None:
        """After training or an error: nothing left running."""


class FrozenThread:
    """One worker thread for no-grad work, plus at most one micro-step prepared ahead of time.

    While a step runs the caller's thread has `threads` OpenMP threads and the worker `full // 2` (at least one);
    `pause()` gives the caller back `full` between steps."""

    def __init__(self, full: int, context: Callable[[], AbstractContextManager]):
        self.full, self.context = full, context
        self.threads = full - full // 2  # the caller's (the student's forward and backward: the longer stream)
        self.worker_threads = max(1, full // 2)
        self.pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[object, object, Future] | None = None  # (batch, generator, its prepared inputs)

    def submit(self, fn: Callable, *args) -> Future:
        """`fn(*args)` on the worker, without grad, under `context()` (autocast is per thread)."""
        def run():
            with torch.no_grad(), self.context():
                return fn(*args)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="lcd-frozen", initializer=use_threads,
                                           initargs=(self.worker_threads,))
        return self.pool.submit(run)

    def prepare_ahead(self, batch, generator, fn: Callable, *args) -> None:
        """Starts preparing the micro-step of `batch` (its draws come from `generator`) after what is queued."""
        self._ahead = (batch, generator, self.submit(fn, *args))

    def take(self, batch, generator):
        """The prepared inputs of `batch`'s micro-step, or None if it was not prepared ahead with `generator`
        (what was prepared for anything else is dropped: its draws are spent)."""
        if self._ahead is None:
            return None
        b, g, future = self._ahead
        self._ahead = None
        result = future.result()  # (raises what the worker raised)
        return result if b is batch and g is generator else None

    def drain(self) -> None:
        """Waits until the worker is idle; what it prepared stays for the step it belongs to."""
        if self._ahead is not None:
            self._ahead[2].result()

    def pause(self) -> None:
        try:
            self.drain()
        finally:
            use_threads(self.full)

    def close(self) -> None:
        """What was prepared ahead dropped (its error, if any, not raised: the caller's own error is the one to
        see), the worker thread gone (a later `submit` starts another) and the caller's threads back to `full`."""
        self._ahead = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        use_threads(self.full)


class Overlapped(Sequential):
    """The frozen passes on a `FrozenThread`: the target's beside the student's forward, the next micro-step's
    teacher pass beside this backward. `upcoming`: (batch, generator) of the next micro-step, or None."""

    def __init__(self, lcd, condition: Callable, context: Callable[[], AbstractContextManager]):
        super().__init__(lcd, condition)
        self.frozen = FrozenThread(torch.get_num_threads(), context)
        self.threads = self.frozen.threads
        log.info("overlap_frozen: the teacher's and the target's passes run on a second thread (%d OpenMP "
                 "thread(s) there, %d for the student's)", self.frozen.worker_threads, self.frozen.threads)

    def prepared(self, batch: dict, generator: torch.Generator):
        """What a micro-step needs before θ: z and c, the draws, and the teacher's solver step ẑ_{t_n}."""
        latents, cond, uncond = self.condition(batch, generator)
        x = self.lcd.noised(latents, generator)
        return x, cond, self.lcd.solver_step(x, cond, uncond)

    def loss(self, batch: dict, generator: torch.Generator, upcoming=None) -> torch.Tensor:
        lcd, frozen = self.lcd, self.frozen
        use_threads(frozen.threads)
        x, cond, z_prev = frozen.take(batch, generator) or self.prepared(batch, generator)
        f_target = frozen.submit(lcd.target_fn, x, z_prev, cond)
        if upcoming is not None:
            frozen.prepare_ahead(*upcoming, self.prepared, *upcoming)
        f_online = lcd.online(x, cond)
        return lcd.distance(f_online.float(), f_target.result().float())

    def drain(self) -> None:
        self.frozen.drain()

    def pause(self) -> None:
        self.frozen.pause()

    def close(self) -> None:
        self.frozen.close()


def random_layers(unet) -> tuple[bool, bool]:
    """Whether `unet` draws stochastic-depth masks, and whether it draws dropout masks (torch's default generator)."""
    modules = list(unet.modules())
    return (any(getattr(m, "drop_prob", 0) > 0 for m in modules),
            any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in modules))


def overlap_obstacles(lcd, student_unet, device: torch.device, compile: bool, sharded: bool = False) -> list[str]:
    """Why the frozen passes may not run beside the student's here (empty: they may)."""
    cannot = []
    if lcd.method.uses_teacher and not isinstance(lcd.teacher, torch.nn.Module):
        cannot.append("the teacher is the student with its adapters switched off (LCM-LoRA), one module whose "
                      "adapters the two threads would switch under each other")
    if any(random_layers(student_unet)) and lcd.target is student_unet:
        cannot.append("the target is the online student (student.ema_target=false), whose dropout or "
                      "stochastic-depth masks two threads would draw from torch's default generator in no fixed order")
    if device.type != "cpu":
        cannot.append(f"the device is {device.type}: on a GPU the passes queue on one stream anyway "
                      "(overlap_frozen is a CPU switch)")
    if compile:
        cannot.append("trainer.compile=true (compiled graphs are not called from two threads here)")
    if sharded:
        cannot.append("trainer.strategy=fsdp (a sharded network's passes gather its weights with collectives, "
                      "which every rank must reach in one order)")
    return cannot


def build(overlap_frozen, lcd, student_unet, condition: Callable, device: torch.device, compile: bool,
          context: Callable[[], AbstractContextManager], sharded: bool = False) -> Sequential:
    """The executor `trainer.overlap_frozen` (auto | true | false) asks for here; auto: overlapped on a CPU with
    >= 2 threads where nothing forbids it."""
    if overlap_frozen not in (True, False, "auto"):
        raise ValueError(f"trainer.overlap_frozen={overlap_frozen!r}: use auto, true or false")
    cannot = overlap_obstacles(lcd, student_unet, device, compile, sharded) if overlap_frozen else []
    if overlap_frozen is True and cannot:
        raise ValueError(f"trainer.overlap_frozen=true cannot run here: {'; '.join(cannot)}. "
                         "Use trainer.overlap_frozen=false (or auto, which turns it off here).")
    wanted = overlap_frozen is True or (overlap_frozen == "auto" and torch.get_num_threads() >= 2 and not cannot)
    return Overlapped(lcd, condition, context) if wanted else Sequential(lcd, condition)
