"""Preemption under `hydra/launcher=submitit_local` (submitit's local executor stands in for SLURM): a job that
gets SIGTERM checkpoints, hands over to submitit's checkpoint protocol, is requeued, resumes from its own
checkpoint in its own folder, and finishes; its MLflow child run holds every step once per value."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from jobs import ENV, TINY, command

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("tasks", [1, 2], ids=["one_task", "two_tasks"])
def test_preempted_submitit_job_is_requeued_and_resumes(tmp_path, tasks):
    """With two tasks per job, the job is one two-rank training run (each task a rank): both ranks checkpoint
    together, submitit requeues the job once, and the job's one MLflow child run records world size 2."""
    from mlflow.tracking import MlflowClient

    sweep = subprocess.Popen(command(["-m", "hydra/launcher=submitit_local", f"hydra.launcher.tasks_per_node={tasks}",
                                      *TINY, "trainer.max_steps=30", "trainer.checkpoint_every=5", "skip.k=20"]),
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def job_log():
        logs = list(tmp_path.glob("multirun/*/*/.submitit/*/*_0_log.out"))
        return logs[0] if logs and " - step 7/30" in logs[0].read_text() else None

    log = wait_for(job_log, 240, "the job's step 7")
    controller = int(log.parent.name)  # the local job id is its controller's pid, which forwards SIGTERM
    os.kill(controller, signal.SIGTERM)
    out, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, out[-3000:]
    text = log.read_text() + Path(str(log).replace("_log.out", "_log.err")).read_text()
    assert "preempted by SIGTERM" in text and "Requeued job" in text
    assert "resumed from" in text and "finished at step 30" in text
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lcm-distill").experiment_id])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED" and child.data.tags["lcm_exp.preempted"] == "false"
    assert child.data.params["world_size"] == str(tasks) and len(runs) == 2  # the parent and this one child
    values: dict[int, set] = {}
    for m in client.get_metric_history(child.info.run_id, "train/loss"):
        values.setdefault(m.step, set()).add(m.value)
    # steps between the checkpoint and the signal ran twice, with the same loss each time
    assert sorted(values) == list(range(1, 31)) and all(len(v) == 1 for v in values.values())
    assert len(list(tmp_path.glob("multirun/*/*/0/student_unet"))) == 1  # the same job folder, finished once
