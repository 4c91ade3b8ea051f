"""Real `lcm-exp` runs read back from their MLflow store (issue 18, items 1 and 3): the experiment's kind, run
names, group options as params, params that do not apply left out, the headline eval metrics, system metrics
and their switch, and `lcm-exp-report` on a sweep over loss dicts."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=smoke", "trainer.max_steps=2", "trainer.batch_size=2", "tracking.validation_steps=[1]",
        "export.enabled=false"]
TINY_EVAL = ["eval.enabled=true", "eval.steps=[1,2]", "eval.num_prompts=2", "eval.reference_steps=4",
             "eval.objective=eval/student_2step/psnr_to_ref"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lcm_exp_cache")


def command(entry, args, cwd, timeout=300):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-c", f"from lcm_exp.cli import {entry}; {entry}()", *args], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p


def train(args, cwd, cache):
    return command("train", [*args, f"teacher.cache_dir={cache}", f"data.cache_dir={cache}"], cwd)


def store(cwd):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(cwd) / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lcm-distill")
    return client, exp, client.search_runs([exp.experiment_id], max_results=100)


def test_single_runs_names_params_and_system_metrics(tmp_path, cache):
    p = train([*TINY, "loss=l2", "skip.k=10", "tracking.system_metrics_interval=0.2"], tmp_path, cache)
    assert "?workflowType=machine_learning&viewStateShareKey=lcm-exp" in p.stdout  # where to look, printed
    client, exp, (run,) = store(tmp_path)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.lcm-exp"])["selectedColumns"]  # ?viewStateShareKey=lcm-exp
    assert {"params.`loss`", "params.`student`", "params.`skip.k`", "metrics.`train/loss`"} <= set(view)
    assert run.info.run_name == "smoke trainer.max_steps=2 trainer.batch_size=2 loss=l2 skip.k=10"
    prm = run.data.params
    assert {k: prm[k] for k in ("loss", "solver", "teacher", "student", "optim", "experiment")} == \
        {"loss": "l2", "solver": "ddim", "teacher": "tiny_random", "student": "full", "optim": "adamw",
         "experiment": "smoke"}
    assert prm["skip.k"] == "10" and prm["loss._target_"] == "lcm_exp.distill.losses.l2"
    assert "loss.huber_c" not in prm and not any(k.startswith("student.lora") for k in prm)
    assert "lcm_exp.not_applicable" not in run.data.tags  # (l2's option has no huber_c: nothing foreign logged)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0.0 <= m.value <= 100.0 for m in cpu)
    ram = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert all(m.value > 10 for m in ram)  # megabytes used by the whole machine

    # the switch: no system metrics at all, and the second run gets its own name
    train([*TINY, "student=lora", "tracking.system_metrics=false", "tracking.system_metrics_interval=0.2"],
          tmp_path, cache)
    _, _, runs = store(tmp_path)
    lora = next(r for r in runs if r.info.run_id != run.info.run_id)
    assert lora.info.run_name == "smoke trainer.max_steps=2 trainer.batch_size=2 student=lora"
    assert not [k for k in lora.data.metrics if k.startswith("system/")]
    assert lora.data.params["student.lora_rank"] == "64" and "student.time_cond_proj_dim" not in lora.data.params


def test_sweep_over_loss_dicts_names_children_and_report_attributes_nothing_foreign(tmp_path, cache):
    losses = "{_target_:lcm_exp.distill.losses.l2},{_target_:lcm_exp.distill.losses.huber,huber_c:0.01}," \
             "{_target_:lcm_exp.distill.losses.huber,huber_c:0.1}"
    train(["-m", *TINY, *TINY_EVAL, f"loss={losses}"], tmp_path, cache)
    client, _, runs = store(tmp_path)
    parent = next(r for r in runs if r.data.tags.get("lcm_exp.sweep") == "parent")
    assert parent.info.run_name.startswith("sweep loss ")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"loss=l2", "loss=huber loss.huber_c=0.01", "loss=huber loss.huber_c=0.1"}
    l2 = children["loss=l2"].data
    assert l2.params["loss"] == "l2" and "loss.huber_c" not in l2.params  # Hydra's own choice said huber
    assert children["loss=huber loss.huber_c=0.1"].data.params["loss.huber_c"] == "0.1"
    for r in children.values():  # the headline section repeats the objective's family, same values
        m = r.data.metrics
        for model in ("student", "teacher_ddim"):
            for n in (1, 2):
                assert m[f"compare/psnr_to_ref/{model}_{n}step"] == m[f"eval/{model}_{n}step/psnr_to_ref"]

    p = command("report", [f"parent={parent.info.run_id}"], tmp_path)
    folder = Path(p.stdout.strip().splitlines()[-1])
    rows = {r["run_id"]: r for r in csv.DictReader(open(folder / "table.csv"))}
    assert {(r["loss"], r["loss.huber_c"]) for r in rows.values()} == {("l2", "n/a"), ("huber", "0.01"),
                                                                        ("huber", "0.1")}
    best = next(line for line in p.stdout.splitlines() if line.startswith("best: "))
    best_run = next(r for r in children.values() if r.info.run_id == best.rsplit(" ", 1)[-1])
    if best_run.data.params["loss"] == "l2":
        assert "huber_c" not in best
    assert (folder / "metrics_vs_loss_huber_c.png").stat().st_size > 10_000
