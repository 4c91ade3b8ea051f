"""Preemption under `hydra/launcher=submitit_local` (submitit's local executor stands in for SLURM): in a sweep of
two jobs, the job that gets SIGTERM checkpoints, hands over to submitit's checkpoint protocol, is requeued, resumes
from its own checkpoint in its own folder, and finishes; the other runs through; each job's MLflow child run holds
every step once per value."""
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
    """A sweep of two jobs (`skip.k=10,20`) under submitit's local executor; one job gets SIGTERM at step 7. With
    two tasks per job, each job is one two-rank training run (each task a rank): both ranks checkpoint together,
    submitit requeues that job once, and every job's one MLflow child run records world size 2. The other job
    runs through untouched; the sweep keeps one parent run with one child per job."""
    from mlflow.tracking import MlflowClient

    sweep = subprocess.Popen(command(["-m", "hydra/launcher=submitit_local", f"hydra.launcher.tasks_per_node={tasks}",
                                      *TINY, "trainer.max_steps=30", "trainer.checkpoint_every=5", "skip.k=10,20"]),
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def job_log():  # the first job (rank 0's log) to reach step 7
        logs = tmp_path.glob("multirun/*/*/.submitit/*/*_0_log.out")
        return next((p for p in logs if " - step 7/30" in p.read_text()), None)

    log = wait_for(job_log, 300, "a job's step 7")
    controller = int(log.parent.name)  # the local job id is its controller's pid, which forwards SIGTERM
    os.kill(controller, signal.SIGTERM)
    out, _ = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, out[-3000:]
    text = log.read_text() + Path(str(log).replace("_log.out", "_log.err")).read_text()
    assert "preempted by SIGTERM" in text and "Requeued job" in text
    assert "resumed from" in text and "finished at step 30" in text
    others = [p for p in tmp_path.glob("multirun/*/*/.submitit/*/*_0_log.out") if p.parent != log.parent]
    assert len(others) == 1 and "preempted by" not in others[0].read_text()  # the other job: never stopped
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lcm-distill").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and sorted(r.data.params["skip.k"] for r in children) == ["10", "20"]
    (requeued,) = [r for r in children if "lcm_exp.preempted_by" in r.data.tags]
    assert requeued.data.tags["lcm_exp.preempted_by"] == "SIGTERM"
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags.get("lcm_exp.preempted", "false") == "false"
        assert child.data.params["world_size"] == str(tasks)
        values: dict[int, set] = {}
        for m in client.get_metric_history(child.info.run_id, "train/loss"):
            values.setdefault(m.step, set()).add(m.value)
        # the requeued job's steps between its checkpoint and the signal ran twice, with the same loss each time
        assert sorted(values) == list(range(1, 31)) and all(len(v) == 1 for v in values.values())
    assert len(list(tmp_path.glob("multirun/*/*/[01]/student_unet"))) == 2  # each job's own folder, finished once
