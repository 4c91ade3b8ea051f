"""System metrics of a run (CPU, RAM, disk, network; GPU utilisation and memory where pynvml or ROCm's
library is present) through MLflow's own monitor, logged as `system/...` beside the training metrics.

MLflow starts its monitor only for runs of `mlflow.start_run(log_system_metrics=True)`; our runs are made with
`MlflowClient`, so the tracker starts the same `SystemMetricsMonitor` on its run id. It samples every
`tracking.system_metrics_interval` seconds and stops at the end of the run; `tracking.system_metrics=false`
turns it off.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
# MLflow reports each start and stop of its monitor at INFO; the run's own log already says it.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def start_monitor(run_id: str, uri: str, interval: float, resume: bool = False):
    """MLflow's SystemMetricsMonitor, started on `run_id`; None (with one warning) where it cannot run."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=uri)
        monitor.start()
    except Exception as e:  # noqa: BLE001 - psutil missing, an old MLflow: the run goes on without them
        log.warning("system metrics are off for this run: %s (tracking.system_metrics=false hides this)", e)
        return None
    log.info("system metrics: every %.3g s as system/* (tracking.system_metrics=false turns them off)", interval)
    return monitor


def stop_monitor(monitor) -> None:
    """Stops sampling and sends what is left."""
    try:
        monitor.finish()
    except Exception as e:  # noqa: BLE001 - never fail the end of a run for them
        log.warning("could not stop the system metrics monitor: %s", e)
