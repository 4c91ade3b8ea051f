"""A persistent Optuna study that several search workers share (the sweeper `hydra/sweeper=lcm_exp_search`,
`hydra_plugins/lcm_exp_search/`), and a search that resumes where it was killed.

What the sweeper needs beyond Optuna's ask/tell, written once here:
- `open_storage`: Optuna's journal file (the default, next to mlflow.db in the start folder) or an RDB URL;
- `open_study`: creates the study or joins it, and says whether this worker founded it (the storage refuses a
  second study of one name, so exactly one worker does): the founder creates the shared MLflow parent run;
- `search_space`: Hydra's sweep syntax (`interval(a, b)`, `tag(log, interval(a, b))`, `a,b,c`, `range(a, b)`)
  as Optuna distributions, every other override passed to each job unchanged;
- `Claims`: the budget and the trials' owners. `n_trials` is the study's budget over all workers: COMPLETE,
  PRUNED, RUNNING and failed trials count; a trial whose worker died does not, it is re-run. Each trial records
  its owner (machine, pid, process start time) and a heartbeat in its user attrs. A killed worker leaves its
  trials RUNNING forever in a journal storage (Optuna's own heartbeat exists only for RDB storages under
  `study.optimize`), so before each ask a worker fails the RUNNING trials whose owner is dead on this machine,
  or whose heartbeat is older than `stale_after_s` (other machines), and queues their params again.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OWNER, BEAT = "lcm_exp.owner", "lcm_exp.heartbeat"  # who runs a trial, and when it last said so
STALE = "lcm_exp.stale"  # failed because its worker died; re-run as the trial whose RETRY_OF names it
SURPLUS = "lcm_exp.surplus"  # asked by two workers at once past the budget: failed at once, never run
RETRY_OF = "lcm_exp.retry_of"


def open_storage(spec: str, start_dir: str | os.PathLike):
    """`spec` with `://` is an RDB URL (sqlite:///..., postgresql://user@host/db, mysql://...); anything else is
    the path of an Optuna journal file, relative to `start_dir`."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if "://" in spec:
        kwargs = {"connect_args": {"timeout": 60}} if spec.startswith("sqlite") else None  # wait, not "locked"
        return RDBStorage(spec, engine_kwargs=kwargs)
    path = Path(start_dir, spec).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(storage, name: str, direction: str, sampler=None):
    """(study, founded): creates the study `name`, or loads it when another worker (or an earlier search) did."""
    import optuna

    try:
        return optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler), True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    if study.direction.name.lower() != direction:
        raise ValueError(f"study {name!r} in this storage is {study.direction.name.lower()}d, not {direction}d: "
                         "give hydra.sweeper.study_name another name, or the study's direction")
    return study, False


def search_space(overrides: list[str]) -> tuple[dict[str, tuple[str, Any]], list[str]]:
    """({param: (override key, distribution)}, fixed overrides). A later override of a key replaces an earlier
    one, so the command line (`optim.lr=1e-4`, or another interval) overrides the sweep file's `params`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries: dict[str, tuple[str, Any]] = {}
    for text, o in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        entries.pop(o.key_or_group, None)  # the later one, in its place
        entries[o.key_or_group] = (o.get_key_element(), distribution(o)) if o.is_sweep_override() else (text, None)
    space = {k: (key, d) for k, (key, d) in entries.items() if d is not None}
    return space, [text for text, d in entries.values() if d is None]


def distribution(o):
    """One sweep override as an Optuna distribution (ints stay ints; `tag(log, ...)` samples on a log scale)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if o.is_choice_sweep():
        return CategoricalDistribution(list(o.sweep_iterator(transformer=Transformer.encode)))
    if o.is_range_sweep():  # range(a, b, s) excludes b, as Python's
        values, step = list(o.sweep_iterator()), o.value().step
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(step))
        return FloatDistribution(values[0], values[-1], step=float(step))
    v = o.value()  # interval(a, b), maybe tagged log
    log_scale = "log" in v.tags
    if isinstance(v.start, int) and isinstance(v.end, int):
        return IntDistribution(v.start, v.end, log=log_scale)
    return FloatDistribution(float(v.start), float(v.end), log=log_scale)


def suggest(trial, name: str, dist) -> Any:
    """The trial's value of `name` (the queued one for a re-run trial), through Optuna's public suggest API."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)


def machine() -> str:
    """This host and its pid namespace: a pid means the same process only within both."""
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def process_started(pid: int) -> float | None:
    """The start time of process `pid` (None: no such process), which tells it from a later one with its pid."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def counts(t) -> bool:
    """Whether a trial uses the budget: everything but queued trials, and failures that are not the trial's."""
    from optuna.trial import TrialState

    if t.state == TrialState.WAITING:
        return False
    return not (t.state == TrialState.FAIL and (t.user_attrs.get(STALE) or t.user_attrs.get(SURPLUS)))


class Claims:
    """This worker's side of a shared study: asks trials within the global budget, owns them (user attrs and a
    heartbeat thread), and fails and re-queues the trials of dead workers."""

    def __init__(self, study, storage, n_trials: int, heartbeat_s: float = 60.0, stale_after_s: float = 600.0):
        self.study, self.storage, self.n_trials = study, storage, n_trials
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.me = {"machine": machine(), "pid": os.getpid(), "started": process_started(os.getpid())}
        self.held: dict[int, Any] = {}  # trial number -> Trial, while it runs
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name="lcm_exp-heartbeat", daemon=True)
        self._beat.start()

    def remaining(self) -> int:
        return self.n_trials - sum(counts(t) for t in self.study.get_trials(deepcopy=False))

    def ask(self):
        """A trial of this worker, or None when other workers took the last of the budget meanwhile."""
        from optuna.trial import TrialState

        trial = self.study.ask()
        trial.set_user_attr(OWNER, self.me)
        trial.set_user_attr(BEAT, time.time())
        self.held[trial.number] = trial
        before = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number and counts(t)]
        if len(before) < self.n_trials:
            return trial
        trial.set_user_attr(SURPLUS, True)  # trial numbers order the asks of all workers: the later ones yield
        self.tell(trial, state=TrialState.FAIL)
        return None

    def tell(self, trial, value: float | None = None, state=None) -> None:
        self.held.pop(trial.number, None)
        self.study.tell(trial, value, state=state)

    def reap(self, mine: bool = False) -> list[Any]:
        """Fails the RUNNING trials of dead workers (with `mine`: this worker's own, when it stops abnormally)
        and queues their params again; returns the failed trials (frozen, before their failure)."""
        from optuna.trial import TrialState

        now, reaped = time.time(), []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not (t.number in self.held if mine else self._dead(t, now)):
                continue
            try:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                    self.storage.get_study_id_from_name(self.study.study_name), t.number)
                self.storage.set_trial_user_attr(trial_id, STALE, True)
                self.study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError) as e:  # failed or finished by another worker meanwhile: theirs
                log.info("trial %d: %s", t.number, e)
                continue
            self.held.pop(t.number, None)
            retry_of = t.user_attrs.get(RETRY_OF, t.number)
            self.study.enqueue_trial(t.params, user_attrs={RETRY_OF: retry_of}, skip_if_exists=False)
            owner = t.user_attrs.get(OWNER) or {}
            log.warning("trial %d (worker pid %s on %s) stopped unfinished: failed, its params queued again",
                        t.number, owner.get("pid"), owner.get("machine"))
            reaped.append(t)
        return reaped

    def _dead(self, t, now: float) -> bool:
        """Whether the worker that runs trial `t` is gone: its process ended (this machine), or it has not
        beaten for `stale_after_s` (another machine)."""
        if t.number in self.held:
            return False
        owner = t.user_attrs.get(OWNER)
        if owner and owner.get("machine") == self.me["machine"]:
            return process_started(owner["pid"]) != owner.get("started")
        last = t.user_attrs.get(BEAT) or t.datetime_start.timestamp()
        return now - last > self.stale_after_s

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            for trial in list(self.held.values()):
                try:
                    trial.set_user_attr(BEAT, time.time())
                except Exception as e:  # noqa: BLE001 - told meanwhile, or the storage is busy: next beat
                    log.debug("heartbeat of trial %d: %s", trial.number, e)

    def close(self) -> None:
        self._stop.set()
