"""`trainer.overlap_frozen`: the frozen networks' passes on a second CPU thread, overlapping the student's.

Of an LCD step's four UNet passes only two are on the critical path from one optimiser step to the next:
the student's forward and backward. The teacher's guided solver step needs neither θ nor θ⁻, so the next
micro-step's (its batch, its draws, the teacher) can run while this step's backward does; the target f_θ⁻
needs θ⁻ after the last EMA update, so it runs while the student's forward does. On a CPU two such streams,
each with half the cores' OpenMP threads, keep the cores busier than one stream of intra-op threads, whose
small ops scale poorly (lcm-exp-bench measures it: `bench.ablate=[overlap_frozen]`).

The numbers are the sequential step's: every random draw is made on the worker thread, in the sequential order
(a step's draws, then the next step's), and the worker never reads what the main thread is writing (θ changes
only after the target pass that reads it has ended; θ⁻ only before the next target pass is handed over).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Callable

import torch


def use_threads(n: int) -> None:
    """The calling thread's OpenMP threads (torch.set_num_threads), set only when they change."""
    if torch.get_num_threads() != n:  # (setting it clears oneDNN's primitive cache: only when it changes)
        torch.set_num_threads(n)


class FrozenThread:
    """One worker thread for no-grad work, plus at most one micro-step prepared ahead of time.

    While a step runs the caller's thread has `threads` OpenMP threads (`Trainer.step` sets it) and the worker
    `full // 2` (at least one); `pause()` gives the caller back `full` between steps (validation, checkpoints,
    the end)."""

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
        """Between steps: the worker idle, and the caller's thread count back to `full`."""
        try:
            self.drain()
        finally:
            use_threads(self.full)

    def close(self) -> None:
        """After training, or when a step failed: what was prepared ahead dropped (cancelled if not started; its
        error, if any, not raised: the caller's own error is the one to see), the worker thread gone (a later
        `submit` starts another) and the caller's threads back to `full`."""
        self._ahead = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        use_threads(self.full)
