"""End to end: `lcm-exp` evaluates at the end of a run; `lcm-exp-eval dir=... | run=...` logs to that run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
STEPS = (1, 2)


def command(name: str, func: str) -> list[str]:
    """The console script when installed (CI: pip install -e .), else the same entry via python -c."""
    exe = shutil.which(name)
    return [exe] if exe else [sys.executable, "-c", f"from lcm_exp.cli import {func}; {func}()"]


def call(cwd: Path, name: str, func: str, *overrides: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    p = subprocess.run([*command(name, func), *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    cache = str(tmp_path_factory.mktemp("cache"))
    out = call(cwd, "lcm-exp", "train", "experiment=smoke", "trainer.max_steps=2", f"teacher.cache_dir={cache}",
               f"data.cache_dir={cache}", "eval.enabled=true", "eval.steps=[1,2]", "eval.num_prompts=4",
               "eval.reference_steps=8", "eval.objective=eval/student_2step/psnr_to_ref")
    (run_dir,) = [p.parent for p in (cwd / "outputs").glob("*/*/lcm_exp_run.json")]
    info = json.loads((run_dir / "lcm_exp_run.json").read_text())
    return cwd, run_dir, info, out, cache


def client(info):
    from mlflow.tracking import MlflowClient

    return MlflowClient(info["tracking_uri"])


def test_run_evaluates_at_the_end(trained):
    cwd, run_dir, info, out, _ = trained
    run = client(info).get_run(info["mlflow_run_id"])
    for model in ("student", "teacher_ddim", "teacher_dpmpp"):
        for n in STEPS:
            for metric in ("mse_to_ref", "psnr_to_ref", "adherence"):
                assert f"eval/{model}_{n}step/{metric}" in run.data.metrics
    # the objective returned (and logged by the runner) is the configured eval metric, direction tagged
    objective = float(re.search(r"objective (\S+)", out.split("finished at step")[-1]).group(1))
    assert objective == pytest.approx(run.data.metrics["eval/student_2step/psnr_to_ref"], rel=1e-5)
    assert run.data.tags["lcm_exp.objective_direction"] == "maximize"
    assert run.data.tags["lcm_exp.output_dir"] == str(run_dir)
    # fid/kid are skipped on a CPU by default: said once each
    assert out.count("metric 'fid' not computed") == 1 and out.count("metric 'kid' not computed") == 1
    for name in ("eval_table.md", "eval_table.csv", "eval_grid.png"):
        assert (run_dir / "eval" / name).stat().st_size > 0
    artifacts = {a.path for a in client(info).list_artifacts(info["mlflow_run_id"], "eval")}
    assert {"eval/eval_table.md", "eval/eval_table.csv", "eval/eval_grid.png"} <= artifacts
    assert (run_dir / "target_unet" / "config.json").exists() and (run_dir / "student_unet" / "config.json").exists()


def test_eval_cli_dir_logs_fid_to_the_run(trained, tmp_path):
    import torch

    # A tiny TorchScript stand-in for Inception (same file interface as eval.fid_weights): the real network costs
    # about a second per image on a CPU; test_eval_metrics checks that the shipped one loads offline.
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, stride=16), torch.nn.ReLU()).eval())
    net.save(str(tmp_path / "feats.pt"))
    cwd, run_dir, info, _, cache = trained
    out = call(cwd, "lcm-exp-eval", "evaluate", f"dir={run_dir}", "eval.steps=[1]", "eval.num_prompts=3",
               "eval.fid=true", f"eval.fid_weights={tmp_path / 'feats.pt'}", "eval.num_real=4",
               "eval.reference_steps=8")
    assert "| student | 1 |" in out and str(run_dir / "eval") in out.splitlines()
    metrics = client(info).get_run(info["mlflow_run_id"]).data.metrics
    for model in ("student", "teacher_ddim", "teacher_dpmpp"):
        assert metrics[f"eval/{model}_1step/fid"] > 0
        assert f"eval/{model}_1step/kid" in metrics


def test_eval_cli_run_id_and_failing_metric(trained):
    cwd, run_dir, info, _, _ = trained
    out = call(cwd, "lcm-exp-eval", "evaluate", f"run={info['mlflow_run_id']}", "eval.steps=[3]",
               "eval.num_prompts=2", "eval.reference_steps=8", "eval.fid=true", "eval.fid_weights=/nonexistent.pt")
    assert out.count("metric 'fid' not computed") == 1 and "/nonexistent.pt" in out
    metrics = client(info).get_run(info["mlflow_run_id"]).data.metrics
    for model in ("student", "teacher_ddim", "teacher_dpmpp"):
        assert f"eval/{model}_3step/psnr_to_ref" in metrics and f"eval/{model}_3step/adherence" in metrics
        assert f"eval/{model}_3step/fid" not in metrics
    assert client(info).get_run(info["mlflow_run_id"]).info.status == "FINISHED"


def test_eval_cli_help_and_cfg(tmp_path):
    out = call(tmp_path, "lcm-exp-eval", "evaluate", "--cfg", "job", "eval.steps=[1,4]")
    assert "steps:" in out and "- 4" in out and "run: null" in out
