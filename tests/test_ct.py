"""Consistency training (method=ct) without a teacher learns on the shapes data: from scratch, the CT loss of
the first steps falls several-fold by the last, with the student's one-step x0 getting closer to the data."""
import os
import statistics
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_ct_from_scratch_learns(tmp_path):
    args = ["experiment=smoke", "method=ct", "method.from_scratch=true", "trainer.max_steps=40", "trainer.log_every=1",
            "loss=l2", "optim.lr=1e-3", f"data.cache_dir={tmp_path}", f"teacher.cache_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    r = subprocess.run([sys.executable, "-c", "from lcm_exp.cli import train; train()", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lcm-distill").experiment_id])
    assert run.data.params["method"] == "ct" and run.data.params["method.from_scratch"] == "True"
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(loss) == 40
    first, last = statistics.mean(loss[:10]), statistics.mean(loss[-10:])
    assert last < first / 2, (first, last)
