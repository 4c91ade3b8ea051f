"""A multirun sweep is one MLflow parent run with one child run per job, whichever launcher runs the jobs.

`conf/config.yaml` registers `MLflowSweepCallback` under `hydra.callbacks`. Before any job starts it creates
the store, the experiment and the parent run (once, so parallel jobs never race on them) and exports the
parent's id in `LCM_EXP_PARENT_RUN_ID`; every job process inherits it (the basic launcher's, and joblib/loky
workers, which are started after this) and tags its run `mlflow.parentRunId`. `LCM_EXP_SWEEP_FIXED` likewise
holds the overrides every job shares, so that each job is named by its own (`lcm_exp.run_names`). A failed
job ends its own run FAILED (runner.py); Hydra then raises after the batch without calling `on_multirun_end`,
so the parent is ended at exit in that case, FAILED.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .run_names import SWEEP_FIXED_ENV, fixed_overrides
from .tracking import PARENT_RUN_ENV, connect, default_uri, redact, run_tags

log = logging.getLogger(__name__)


class MLflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.client = None
        self.parent_id: str | None = None
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        tc = config.get("tracking")
        if tc is None or not tc.get("enabled", True):
            return
        uri = tc.get("uri") or default_uri(os.getcwd())
        self.client, exp_id = connect(uri, tc.get("experiment", "lcm-distill"))
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        tags = {k: v for k, v in run_tags().items() if not k.startswith("hydra.")}
        tags.update({"lcm_exp.sweep": "parent", "hydra.sweep.dir": str(sweep_dir),
                     "hydra.overrides": redact(" ".join(config.hydra.overrides.task)) or "(none)",
                     "hydra.job.name": str(config.hydra.job.name)})
        overrides = list(config.hydra.overrides.task)
        fixed = fixed_overrides(overrides)
        run = self.client.create_run(exp_id, run_name=sweep_name(config, overrides, fixed, sweep_dir), tags=tags)
        self.parent_id = run.info.run_id
        self.sweep_dir = sweep_dir
        os.environ[PARENT_RUN_ENV] = self.parent_id
        os.environ[SWEEP_FIXED_ENV] = json.dumps(fixed)  # each job is named by the overrides not in this list
        atexit.register(self._end, "FAILED")
        log.info("MLflow sweep: parent run %s at %s", self.parent_id, redact(uri))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._record_best()
        self._end("FINISHED")

    def _record_best(self) -> None:
        """An optimising sweeper (Optuna) leaves `optimization_results.yaml` in the sweep folder: its best
        parameters and value become tags of the parent run (and the file an artifact)."""
        if self.client is None or self.sweep_dir is None:
            return
        path = self.sweep_dir / "optimization_results.yaml"
        if not path.is_file():
            return
        try:
            from omegaconf import OmegaConf

            res = OmegaConf.to_container(OmegaConf.load(path))
            best = res.get("best_params") or {}
            tags = {"lcm_exp.best_params": " ".join(f"{k}={v}" for k, v in best.items())}
            if "best_value" in res:
                tags["lcm_exp.best_value"] = str(res["best_value"])
            for k, v in tags.items():
                self.client.set_tag(self.parent_id, k, v)
            self.client.log_artifact(self.parent_id, str(path))
        except Exception as e:  # noqa: BLE001 - never fail the sweep for its summary
            log.warning("could not record the sweep's best parameters from %s: %s", path, e)

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
