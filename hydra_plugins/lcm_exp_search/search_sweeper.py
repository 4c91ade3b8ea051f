"""`hydra/sweeper=lcm_exp_search` (sweeps/search.yaml): a Bayesian search whose Optuna study lives in persistent
storage, so that any number of workers (shells, machines, cluster tasks) add trials to one study and a killed
search resumes where it stopped.

Thin by design, on Optuna's ask/tell and Hydra's launcher: each worker asks trials within the study's global
budget (`n_trials`), launches them through the configured launcher (job number = trial number, so job folders
and MLflow child runs stay distinct across workers) and tells their objective. The study's bookkeeping (storage,
search space, budget, owners, dead workers' trials) is `lcm_exp.tracking.study`; the one MLflow parent run of a study is
`lcm_exp.tracking.sweeps.StudyParent`. Why not hydra-optuna-sweeper: 1.3 pins optuna < 3 (no working RDB storage
under SQLAlchemy 2), 1.4's pre-releases need hydra-core 1.4 and do not share a study across processes.
"""
# no `from __future__ import annotations`: Hydra runs this module before it is in sys.modules, where
# dataclasses look string annotations up
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class SearchSweeperConf:
    _target_: str = "hydra_plugins.lcm_exp_search.search_sweeper.SearchSweeper"
    study_name: str = "lcm-exp-search"  # the study to create or join: a new name starts a new search
    storage: str = "optuna-journal.log"  # journal file (relative: to the start folder) or an RDB URL
    direction: str = "auto"  # auto: the objective's (lcm_exp.runner.objective_tags); or minimize / maximize
    n_trials: int = 20  # the study's budget over all workers: COMPLETE + PRUNED + RUNNING + failed trials
    n_jobs: int = 1  # trials per launch of this worker (in parallel with a parallel launcher)
    sampler: Dict[str, Any] = field(default_factory=lambda: {
        "_target_": "optuna.samplers.TPESampler", "_partial_": True, "seed": None})  # seeded per trial: seed + n
    params: Dict[str, str] = field(default_factory=dict)  # key: interval(a, b) | tag(log, interval(a, b)) | a,b,c
    heartbeat_s: float = 60.0  # how often a worker says its trials still run
    stale_after_s: float = 600.0  # a trial of another machine without a heartbeat this long is re-run


ConfigStore.instance().store(group="hydra/sweeper", name="lcm_exp_search", node=SearchSweeperConf,
                             provider="lcm_exp")


class SearchSweeper(Sweeper):
    owns_mlflow_parent = True  # one parent run per study, not per process (lcm_exp.tracking.sweeps)

    def __init__(self, study_name: str, storage: str, direction: str, n_trials: int, n_jobs: int, sampler: Any,
                 params: Optional[DictConfig], heartbeat_s: float, stale_after_s: float) -> None:
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.n_trials, self.n_jobs, self.sampler = n_trials, max(1, n_jobs), sampler
        self.params = dict(params or {})
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        from lcm_exp.tracking.study import Claims, open_storage, open_study, search_space
        from lcm_exp.tracking.sweeps import StudyParent

        space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        direction = self.direction if self.direction != "auto" else self._objective_direction(fixed)
        storage = open_storage(self.storage, self.config.hydra.runtime.cwd)
        study, founded = open_study(storage, self.study_name, direction, self._sampler(0))
        parent = StudyParent.join(self.config, study, founded)
        claims = Claims(study, storage, self.n_trials, self.heartbeat_s, self.stale_after_s)
        try:
            self._reap(claims, parent)
            log.info("search: study %r (%s, %s), %d of %d trials to go, searching %s", self.study_name,
                     "new" if founded else "joined", direction, max(0, claims.remaining()), self.n_trials,
                     ", ".join(space) or "nothing")
            while (n := min(self.n_jobs, claims.remaining())) > 0:
                trials = [t for t in (claims.ask() for _ in range(n)) if t is not None]
                self._run(study, claims, trials, space, fixed)
                self._reap(claims, parent)
        except BaseException:
            self._abandon(claims, parent, study)
            raise
        finally:
            claims.close()
        results = self._write_results(study)
        if parent is not None:
            parent.end("FINISHED" if self._done(study, claims) else "RUNNING", results)

    def _run(self, study, claims, trials, space, fixed) -> None:
        """Suggests each trial's params, launches the trials, tells their objectives. A failed job is a FAIL
        trial; it then stops this worker with the job's error, as in any Hydra sweep."""
        from lcm_exp.tracking.study import suggest
        from optuna.trial import TrialState

        jobs = []
        for trial in trials:
            study.sampler = self._sampler(trial.number)  # distinct streams in every worker, reproducible alone
            jobs.append([*fixed, *(f"{key}={suggest(trial, name, dist)}" for name, (key, dist) in space.items())])
        returns, start = [], 0
        for i in range(1, len(trials) + 1):  # consecutive trial numbers in one launch: job number = trial number
            if i == len(trials) or trials[i].number != trials[i - 1].number + 1:
                returns += self.launcher.launch(jobs[start:i], initial_job_idx=trials[start].number)
                start = i
        failed = None
        for trial, ret in zip(trials, returns):
            try:
                value = float(ret.return_value)  # raises the job's own error when it failed
            except Exception:  # noqa: BLE001
                claims.tell(trial, state=TrialState.FAIL)
                failed = failed or ret
            else:
                claims.tell(trial, value)  # nan: Optuna records a FAIL
        if failed is not None:
            failed.return_value  # noqa: B018 - raises it

    @staticmethod
    def _reap(claims, parent) -> None:
        """Dead workers' RUNNING trials: failed and queued again, their MLflow runs ended FAILED."""
        reaped = claims.reap()
        if parent is not None:
            parent.fail_children([t.number for t in reaped])

    def _abandon(self, claims, parent, study) -> None:
        """This worker stops abnormally (an error, Ctrl-C): its running trials are failed and queued again."""
        try:
            claims.reap(mine=True)
            if parent is not None:
                parent.end("FAILED" if self._done(study, claims) else "RUNNING")
        except Exception as e:  # noqa: BLE001 - the original error matters more
            log.warning("could not hand back this worker's trials: %s", e)

    def _done(self, study, claims) -> bool:
        from optuna.trial import TrialState

        return claims.remaining() <= 0 and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    def _sampler(self, n: int):
        """The configured sampler (a partial, `_partial_: true`), seeded `seed + n` when a seed is set."""
        if not callable(self.sampler):
            return self.sampler
        seed = getattr(self.sampler, "keywords", {}).get("seed")
        return self.sampler(seed=seed + n) if seed is not None else self.sampler()

    def _objective_direction(self, fixed: List[str]) -> str:
        """minimize or maximize, from the jobs' objective (eval.objective, or train/loss without eval)."""
        from hydra.utils import instantiate

        from lcm_exp.runner import objective_tags

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(fixed))
        return objective_tags(instantiate(cfg.eval)(device="cpu"))["lcm_exp.objective_direction"]

    def _write_results(self, study) -> Optional[Path]:
        """`optimization_results.yaml` in the sweep folder: the study's best trial so far (all workers')."""
        from lcm_exp.tracking.tracker import redact
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            return None
        best = study.best_trial
        path = Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({
            "name": "lcm_exp_search", "study_name": self.study_name, "storage": redact(self.storage),
            "direction": study.direction.name.lower(), "best_trial": best.number, "best_params": best.params,
            "best_value": best.value, "n_complete": len(complete)}), path)
        log.info("search: best trial %d, value %.6g, params %s (%d complete)", best.number, best.value,
                 best.params, len(complete))
        return path
