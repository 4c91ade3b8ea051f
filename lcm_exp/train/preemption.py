"""Preemption: SIGTERM, SIGUSR1 (what SLURM sends before a time limit, `--signal=USR1@T`) and SIGUSR2 (submitit's
time-limit and preemption signal) stop a run cleanly.

While the training loop runs, a signal only sets a flag: the loop checkpoints at the next step boundary and raises
`Preempted`; a single process waiting for data at a boundary (a stalled stream) stops at once, and the runner
checkpoints the last finished step. Anywhere else (loading, the end-of-run validation, export and evaluation) the handler raises
`Preempted` at once; the runner then writes a checkpoint if the trained state is not saved yet. Either way the
MLflow run is tagged `lcm_exp.preempted` and ended KILLED, and the process exits with `EXIT_PREEMPTED`, so a
scheduler can tell a preempted job from a failed one; `trainer.resume=latest` continues it where it stopped.

Under submitit (`hydra/launcher=submitit_slurm|submitit_local`) the job hands over to submitit's own handler
instead (`requeue_with_submitit`): it requeues the Hydra job, which runs again in the same output folder and
resumes from its own newest checkpoint by itself.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" (1 = failed, 2 = a configuration error)
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class Preempted(BaseException):
    """A preemption signal arrived; raised where the run can stop (a BaseException: no `except Exception` of a
    library swallows it)."""

    def __init__(self, signame: str):
        super().__init__(f"stopped by {signame}")
        self.signame = signame


class SignalGuard:
    """Handlers for `SIGNALS` for the duration of a `with` block (the previous handlers come back after it).

    `deferred()` is the training loop's region: there a signal only sets `requested`."""

    def __init__(self, signals=SIGNALS):
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.requested: str | None = None
        self._defer = 0
        self._waiting = 0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        first = self.requested is None
        self.requested = self.requested or name
        if self._defer and not self._waiting:
            if first:
                log.warning("%s received: checkpointing at the next step boundary, then stopping", name)
            return
        raise Preempted(name)

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():  # (signals can only be handled there)
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def deferred(self):
        guard = self

        class _Deferred:
            def __enter__(self):
                guard._defer += 1
                return guard

            def __exit__(self, *exc):
                guard._defer -= 1
                return False

        return _Deferred()

    def interruptible(self):
        """Inside `deferred()`, a region where the run only waits (for data, at a step boundary): a signal stops
        it at once, as outside, and one that came before entering stops it on entry."""
        guard = self

        class _Waiting:
            def __enter__(self):
                if guard.requested:
                    raise Preempted(guard.requested)
                guard._waiting += 1
                return guard

            def __exit__(self, *exc):
                guard._waiting -= 1
                return False

        return _Waiting()

    def check(self) -> None:
        """Outside `deferred()`: raise for a signal that arrived while deferred."""
        if self.requested and not self._defer:
            raise Preempted(self.requested)


def under_submitit() -> bool:
    import os

    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def requeue_with_submitit() -> None:
    """Calls submitit's handler of its preemption signal (installed before our job started, restored when our
    guard ended): it asks the launcher for the job's resubmission, requeues it and exits the process. Only
    submitit's rank 0 requeues; on other ranks the handler returns."""
    import os

    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
    handler = signal.getsignal(sig)
    if callable(handler):
        log.info("submitit: handing over to its %s handler (checkpoint protocol: requeue)", sig.name)
        handler(sig, None)
