"""MLflow tracking: the store, the run, params, metrics and artifacts (DESIGN.md, Tracking contract)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline, its telemetry thread can crash the client

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
CUT_MARKER = "...[cut]"


def default_uri(start_dir: str | os.PathLike | None = None) -> str:
    """`sqlite:///` + the absolute path of mlflow.db in the folder the command started from."""
    return "sqlite:///" + str((Path(start_dir or os.getcwd()) / "mlflow.db").resolve())


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"skip.k": "20", ...}; values over MLflow's limit are cut with a visible marker."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            text = str(value)
            out[name] = text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - len(CUT_MARKER)] + CUT_MARKER
    return out


class MLflowTracker:
    """One MLflow run per job; only the main process of a multi-process job talks to MLflow."""

    def __init__(self, uri: str | None = None, experiment: str = "lcm-distill", run_name: str | None = None,
                 enabled: bool = True, start_dir: str | None = None):
        self.uri = uri or default_uri(start_dir)
        self.experiment, self.run_name, self.enabled = experiment, run_name, enabled
        self.client = None
        self.run_id: str | None = None

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
              run_id: str | None = None) -> str | None:
        """Starts (or, with `run_id`, continues) the run and logs the flattened params."""
        if not self.enabled:
            return None
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, run_name=self.run_name, tags=dict(tags or {}))
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            flat = [Param(k, v) for k, v in flatten(params).items()]
            for i in range(0, len(flat), 100):
                self.client.log_batch(self.run_id, params=flat[i:i + 100])
        return self.run_id

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.client is None:
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.client is None:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.client = None
