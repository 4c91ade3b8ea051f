"""A multirun sweep is one MLflow parent run with one child run per job, whichever launcher runs the jobs.

`conf/config.yaml` registers `MLflowSweepCallback` under `hydra.callbacks`. Before any job starts it creates
the store, the experiment and the parent run (once, so parallel jobs never race on them) and exports the
parent's id in `LCM_EXP_PARENT_RUN_ID`; every job process inherits it (the basic launcher's, and joblib/loky
workers, which are started after this) and tags its run `mlflow.parentRunId`. `LCM_EXP_SWEEP_FIXED` likewise
holds the overrides every job shares, so that each job is named by its own (`lcm_exp.tracking.names`). A failed
job ends its own run FAILED (runner.py); Hydra then raises after the batch without calling `on_multirun_end`,
so the parent is ended at exit in that case, FAILED.

A search on a persistent study (`hydra/sweeper=lcm_exp_search`) outlives one process: several workers, and a
resumed search, add trials to one study. Its sweeper says so (`owns_mlflow_parent`), the callback stands aside,
and the sweeper uses `StudyParent`: one parent run per study, named in the study's user attrs.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .names import SWEEP_FIXED_ENV, fixed_overrides
from .provenance import run_tags
from .tracker import PARENT_RUN_ENV, connect, default_uri, redact

log = logging.getLogger(__name__)
STUDY_PARENT_ATTR = "lcm_exp.mlflow_parent_run_id"  # the study's user attr naming its parent run


def connect_sweep(config: DictConfig):
    """(client, experiment id) of the sweep's store, or None when tracking is off."""
    tc = config.get("tracking")
    if tc is None or not tc.get("enabled", True):
        return None
    return connect(tc.get("uri") or default_uri(os.getcwd()), tc.get("experiment", "lcm-distill"))


def create_parent(client, exp_id: str, config: DictConfig, name: str, **extra: str) -> str:
    """A new parent run tagged with the sweep's folder, overrides and provenance; returns its id."""
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    tags = {k: v for k, v in run_tags().items() if not k.startswith("hydra.")}
    tags.update({"lcm_exp.sweep": "parent", "hydra.sweep.dir": str(sweep_dir),
                 "hydra.overrides": redact(" ".join(config.hydra.overrides.task)) or "(none)",
                 "hydra.job.name": str(config.hydra.job.name), **extra})
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


def record_best(client, parent_id: str, path: Path) -> None:
    """An optimising sweeper leaves `optimization_results.yaml` in the sweep folder: its best parameters and
    value become tags of the parent run (and the file an artifact)."""
    if not path.is_file():
        return
    try:
        res = OmegaConf.to_container(OmegaConf.load(path))
        best = res.get("best_params") or {}
        tags = {"lcm_exp.best_params": " ".join(f"{k}={v}" for k, v in best.items())}
        if "best_value" in res:
            tags["lcm_exp.best_value"] = str(res["best_value"])
        for k, v in tags.items():
            client.set_tag(parent_id, k, v)
        client.log_artifact(parent_id, str(path))
    except Exception as e:  # noqa: BLE001 - never fail the sweep for its summary
        log.warning("could not record the sweep's best parameters from %s: %s", path, e)


def sweeper_owns_parent(config: DictConfig) -> bool:
    """Whether the configured sweeper manages the parent run itself (class attribute `owns_mlflow_parent`)."""
    target = OmegaConf.select(config, "hydra.sweeper._target_")
    if not target or not str(target).startswith("hydra_plugins."):
        return False
    from hydra.utils import get_class

    return bool(getattr(get_class(str(target)), "owns_mlflow_parent", False))


class MLflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.client = None
        self.parent_id: str | None = None
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if sweeper_owns_parent(config):
            return
        store = connect_sweep(config)
        if store is None:
            return
        self.client, exp_id = store
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        overrides = list(config.hydra.overrides.task)
        fixed = fixed_overrides(overrides)
        self.parent_id = create_parent(self.client, exp_id, config,
                                       sweep_name(config, overrides, fixed, self.sweep_dir))
        os.environ[PARENT_RUN_ENV] = self.parent_id
        os.environ[SWEEP_FIXED_ENV] = json.dumps(fixed)  # each job is named by the overrides not in this list
        atexit.register(self._end, "FAILED")
        log.info("MLflow sweep: parent run %s at %s", self.parent_id, redact(self.client.tracking_uri))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.client is not None and self.sweep_dir is not None:
            record_best(self.client, self.parent_id, self.sweep_dir / "optimization_results.yaml")
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self.client is None or self.parent_id is None:
            return
        try:
            self.client.set_terminated(self.parent_id, status=status)
        except Exception as e:  # noqa: BLE001
            log.warning("could not end the sweep's parent run %s: %s", self.parent_id, e)
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_FIXED_ENV, None)
        self.client = None


def sweep_name(config: DictConfig, overrides: list[str], fixed: list[str], sweep_dir: Path) -> str:
    """`sweep loss 2026-01-01/12-00-00` (+sweep=loss), or the swept keys: `sweep skip.k, loss ...`."""
    what = config.hydra.runtime.choices.get("sweep")
    if not what:
        what = ", ".join(o.split("=", 1)[0].lstrip("+~") for o in overrides if o not in fixed)
    return f"sweep {what or ''} {sweep_dir.parent.name}/{sweep_dir.name}".replace("  ", " ")


class StudyParent:
    """The one parent run of a persistent search study, shared by all its workers and by a resumed search.

    The worker that founded the study creates the run and names it in the study's user attrs; the others wait
    for that name (they start at the same time, and must neither create a second parent nor race on a new
    store), then join it. Whoever ends the study's last trial ends the run."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def join(cls, config: DictConfig, study, founded: bool, wait_s: float = 120.0) -> "StudyParent | None":
        if config.get("tracking") is None or not config.tracking.get("enabled", True):
            return None
        deadline = time.monotonic() + (0 if founded else wait_s)
        while not (run_id := study.user_attrs.get(STUDY_PARENT_ATTR)) and time.monotonic() < deadline:
            time.sleep(0.5)
        client, exp_id = connect_sweep(config)
        if run_id:  # a resumed search reopens its parent
            if client.get_run(run_id).info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        else:  # the founder (or a worker whose founder died before naming a parent)
            run_id = create_parent(client, exp_id, config, f"search {study.study_name}",
                                   **{"lcm_exp.study": study.study_name})
            study.set_user_attr(STUDY_PARENT_ATTR, run_id)
        os.environ[PARENT_RUN_ENV] = run_id
        os.environ[SWEEP_FIXED_ENV] = json.dumps(fixed_overrides(list(config.hydra.overrides.task)))
        log.info("MLflow search: parent run %s at %s", run_id, redact(client.tracking_uri))
        return cls(client, run_id)

    def fail_children(self, job_nums: list[int]) -> None:
        """Ends FAILED the child runs that dead workers left RUNNING (a trial's job number is its number)."""
        exp_id = self.client.get_run(self.run_id).info.experiment_id if job_nums else None
        for n in job_nums:
            query = f"tags.`mlflow.parentRunId` = '{self.run_id}' AND tags.`hydra.job.num` = '{n}'"
            for run in self.client.search_runs([exp_id], query):
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, status="FAILED")

    def end(self, status: str, results: Path | None = None) -> None:
        if results is not None:
            record_best(self.client, self.run_id, results)
        if status != "RUNNING":
            self.client.set_terminated(self.run_id, status=status)
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_FIXED_ENV, None)
