"""Real `lcm-exp` commands against the default sqlite store: sweeps (joblib and basic launchers), a failing
job, artifacts, and fail-fast on an unreachable server."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FAST = ["experiment=smoke", "trainer.batch_size=2", "tracking.validation_steps=[1]"]


@pytest.fixture(scope="session")
def lcm_exp_cache(tmp_path_factory):
    """One teacher/dataset cache for every command of the session (built once)."""
    return tmp_path_factory.mktemp("lcm_exp_cache")


def lcm_exp(args, cwd, cache, timeout=600, **kw):
    """Runs the `lcm-exp` console script (or its entry point) in `cwd`; returns (rc, output)."""
    exe = shutil.which("lcm-exp")
    cmd = ([exe] if exe else [sys.executable, "-c", "from lcm_exp.cli import train; train()"])
    cmd += [*args, f"teacher.cache_dir={cache}", f"data.cache_dir={cache}"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    return p.returncode, p.stdout + p.stderr


def store(cwd):
    from mlflow.tracking import MlflowClient

    uri = "sqlite:///" + str((Path(cwd) / "mlflow.db").resolve())
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lcm-distill")
    return client, client.search_runs([exp.experiment_id], max_results=100)


def artifact_paths(client, run_id, path=None):
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def test_joblib_sweep_is_one_parent_with_four_children(tmp_path, lcm_exp_cache):
    rc, out = lcm_exp(["-m", *FAST, "trainer.max_steps=3", "loss=l2,huber", "ema.decay=0.9,0.95",
                       "hydra/launcher=joblib"], tmp_path, lcm_exp_cache)
    assert rc == 0, out[-3000:]
    client, runs = store(tmp_path)
    parents = [r for r in runs if r.data.tags.get("lcm_exp.sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    assert len(children) == 4 and len(runs) == 5
    assert {(r.data.params["loss._target_"], r.data.params["ema.decay"]) for r in children} == \
        {(f"lcm_exp.distill.losses.{loss}", decay) for loss in ("l2", "huber") for decay in ("0.9", "0.95")}
    for r in children:
        assert r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1, 2, 3]
        assert r.data.tags["hydra.sweep.dir"] == parents[0].data.tags["hydra.sweep.dir"]
        assert r.data.tags["lcm_exp.sweep_id"] == pid and r.data.tags["hydra.mode"] == "MULTIRUN"


def test_basic_sweep_failed_job_is_kept_and_the_sweep_goes_on(tmp_path, lcm_exp_cache):
    rc, out = lcm_exp(["-m", *FAST, "trainer.max_steps=2", "trainer.validation_every=1",
                       "teacher.pretrained=/nonexistent/teacher,null"], tmp_path, lcm_exp_cache)
    assert rc != 0  # Hydra reports the failed job after the sweep
    client, runs = store(tmp_path)
    parent = next(r for r in runs if r.data.tags.get("lcm_exp.sweep") == "parent")
    assert parent.info.status == "FAILED"
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["hydra.job.num"]))
    assert len(children) == 2
    failed, ok = children
    assert failed.info.status == "FAILED" and "/nonexistent/teacher" in failed.data.tags["lcm_exp.error"]
    assert "error.txt" in artifact_paths(client, failed.info.run_id)

    # the job after the failure ran completely: metrics, params, tags, artifacts
    rid = ok.info.run_id
    assert ok.info.status == "FINISHED"
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/step_time_ms"):
        assert [m.step for m in client.get_metric_history(rid, name)] == [1, 2], name
    p, t = ok.data.params, ok.data.tags
    assert p["trainer.max_steps"] == "2" and p["skip.k"] == "20" and p["tracking.experiment"] == "lcm-distill"
    assert "teacher.pretrained=null" in t["hydra.overrides"] and t["hydra.job.name"]
    for key in ("torch.version", "diffusers.version", "lcm_exp.version", "host"):
        assert t[key], key
    arts = artifact_paths(client, rid)
    assert {"config/resolved_config.yaml", "config/.hydra/config.yaml", "config/.hydra/overrides.yaml",
            "validation/step_000001/student.png", "validation/step_000001/target.png",
            "validation/step_000002/student.png", "validation/step_000002/target.png"} <= arts
    from PIL import Image

    png = Path(client.download_artifacts(rid, "validation/step_000002/student.png", str(tmp_path)))
    width, height = Image.open(png).size  # 4 prompts x 1 step count, 32 px samples shown at 128 px, captioned
    assert 4 * 128 < width < 4 * 128 + 150 and 128 < height < 320


def test_unreachable_server_at_start_fails_fast(tmp_path, lcm_exp_cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    rc, out = lcm_exp([*FAST, f"tracking.uri=http://127.0.0.1:{port}"], tmp_path, lcm_exp_cache, timeout=300)
    assert rc != 0
    assert f"Cannot reach the MLflow tracking store http://127.0.0.1:{port}" in out and "tracking.uri" in out
    assert "step 1/" not in out  # nothing trained
    assert time.time() - t0 < 120  # seconds (mostly imports), not minutes of HTTP retries
