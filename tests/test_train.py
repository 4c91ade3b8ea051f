"""A real `lcm-exp` run on the tiny random teacher: loss tracked in MLflow, checkpoints, resume."""
import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
ARGS = ["teacher=tiny_random", "data.resolution=32", "data.num_samples=200", "trainer.batch_size=4",
        "trainer.log_every=1", "eval.enabled=false", "loss=huber", "skip.k=20", "guidance.w_min=3", "guidance.w_max=9", "ema.decay=0.95"]


def lcm_exp(*args, cwd, expect: int = 0):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", "from lcm_exp.cli import train; train()", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == expect, r.stderr[-4000:]
    return r


def runs(cwd):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lcm-distill")
    return client, client.search_runs([exp.experiment_id])


def test_run_tracks_checkpoints_and_resumes(tmp_path):
    lcm_exp(*ARGS, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.checkpoints_total_limit=1",
            cwd=tmp_path)
    client, (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["skip.k"] == "20" and p["loss._target_"] == "lcm_exp.distill.losses.huber" and p["guidance.w_max"] == "9.0"
    assert p["ema.decay"] == "0.95" and p["trainer.max_steps"] == "4"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert all(0 < m.value < 10 for m in history)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lr")] != []
    ckpts = sorted(tmp_path.glob("outputs/*/*/checkpoints/checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-4"]  # checkpoint-2 pruned by checkpoints_total_limit=1
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["mlflow_run_id"] == run.info.run_id
    assert (ckpts[0] / "model.safetensors").exists() and (ckpts[0] / "optimizer.bin").exists()

    # resume=latest continues the same configuration at step 5, in the same MLflow run
    r = lcm_exp(*ARGS, "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.resume=latest", cwd=tmp_path)
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    client, (run2,) = runs(tmp_path)
    assert run2.info.run_id == run.info.run_id and run2.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
    assert len(list(tmp_path.glob("outputs/*/*/checkpoints/checkpoint-6"))) == 1

    # a different configuration does not pick that checkpoint up silently: it stops, naming what differs, and
    # without trainer.resume it is a new run
    r = lcm_exp(*ARGS, "trainer.max_steps=1", "skip.k=10", "trainer.resume=latest", cwd=tmp_path, expect=2)
    assert "was trained with another configuration: skip.k: 20 -> 10" in r.stderr
    lcm_exp(*ARGS, "trainer.max_steps=1", "skip.k=10", cwd=tmp_path)
    _, all_runs = runs(tmp_path)
    assert len(all_runs) == 2


def test_v_prediction_teacher_trains(tmp_path):
    lcm_exp(*ARGS, "trainer.max_steps=2", "teacher.arch.prediction_type=v_prediction", "solver=heun", "loss=l2",
            cwd=tmp_path)
    client, (run,) = runs(tmp_path)
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) == 2 and all(m.value > 0 for m in losses)
