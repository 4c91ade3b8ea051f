"""Sweeps (issue 6): every sweeps/*.yaml composes as `+sweep=NAME`; real tiny sweeps with the joblib and
submitit_local launchers and the Optuna search; `lcm-exp-report` on a finished sweep."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))
TINY = ["experiment=smoke", "trainer.max_steps=2", "trainer.batch_size=2", "tracking.validation_steps=[1]",
        "export.enabled=false"]
TINY_EVAL = ["eval.enabled=true", "eval.steps=[1,2]", "eval.num_prompts=2", "eval.reference_steps=4",
             "eval.objective=eval/student_2step/psnr_to_ref"]


def compose_sweep(name: str):
    from hydra import compose, initialize_config_dir

    from lcm_exp.cli import config_dir, register_sweeps

    register_sweeps()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True)


def test_the_seven_studies_are_there():
    assert {"skip_k", "loss", "guidance", "ema", "solver", "search", "methods"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_composes_as_a_multirun_with_params(name):
    text = (REPO / "sweeps" / f"{name}.yaml").read_text()
    assert "Question:" in text and "Cost:" in text  # what it answers, how long it takes
    cfg = compose_sweep(name)
    assert str(cfg.hydra.mode) in ("MULTIRUN", "RunMode.MULTIRUN")
    params = cfg.hydra.sweeper.params
    assert params and all(str(v).strip() for v in params.values())
    assert cfg.hydra.runtime.choices["sweep"] == name


def test_sweep_values():
    assert compose_sweep("skip_k").hydra.sweeper.params["skip.k"] == "1,5,10,20,50"
    assert compose_sweep("solver").hydra.sweeper.params["solver"] == "ddim,euler,heun"
    loss = compose_sweep("loss").hydra.sweeper.params["loss"]
    assert loss.count("losses.l2") == 1 and loss.count("losses.huber") >= 3
    search = compose_sweep("search")
    assert search.hydra.sweeper._target_.endswith("SearchSweeper") and search.hydra.sweeper.direction == "auto"
    assert set(search.hydra.sweeper.params) == {"optim.lr", "loss.huber_c", "guidance.w_min", "guidance.w_max",
                                                "ema.decay"}
    assert search.eval.enabled


# ------------------------------------------------------------------------------------------- real sweeps
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lcm_exp_cache")


JOBS = {"skip_k": 5, "loss": 5, "guidance": 4, "ema": 5, "solver": 3}  # the README's table (methods: below)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_job_of_every_sweep_file_runs(tmp_path, cache, name):
    """Each study as shipped (one training step per job): every job composes, validates and trains."""
    rc, out, _ = lcm_exp([f"+sweep={name}", *TINY, "trainer.max_steps=1"], tmp_path, cache)
    assert rc == 0, out[-3000:]
    _, parent, children = store(tmp_path)
    assert len(children) == JOBS[name] and all(r.info.status == "FINISHED" for r in children), out[-3000:]
    if name == "loss":  # l2 once, without huber's huber_c; huber at each c
        params = sorted((r.data.params["loss"], r.data.params.get("loss.huber_c")) for r in children)
        assert params == [("huber", "0.0001"), ("huber", "0.001"), ("huber", "0.01"), ("huber", "0.1"), ("l2", None)]


def env():
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def command(entry: str, args, cwd, timeout=300):
    cmd = [sys.executable, "-c", f"from lcm_exp.cli import {entry}; {entry}()", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, p.stdout


def lcm_exp(args, cwd, cache):
    return command("train", [*args, f"teacher.cache_dir={cache}", f"data.cache_dir={cache}"], cwd)


def store(cwd):
    from mlflow.tracking import MlflowClient

    client = MlflowClient("sqlite:///" + str((Path(cwd) / "mlflow.db").resolve()))
    runs = client.search_runs([client.get_experiment_by_name("lcm-distill").experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("lcm_exp.sweep") == "parent"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(runs) == len(children) + 1
    return client, parents[0], children


def artifact_paths(client, run_id, path=None):
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


@pytest.mark.slow
def test_methods_sweep_report_draws_a_line_per_method(tmp_path, cache):
    """`+sweep=methods` (here 2 steps per job, a tiny evaluation, no FID): one child per method, the report's
    table ranks them and its metric-vs-steps chart has one line per method; the MLflow view has a method column."""
    import json

    rc, out, _ = lcm_exp(["+sweep=methods", *TINY, *TINY_EVAL, "eval.fid=false"], tmp_path, cache)
    assert rc == 0, out[-3000:]
    client, parent, children = store(tmp_path)
    assert sorted(r.data.params["method"] for r in children) == ["ct", "dmd2", "lcd", "pcm", "tcd"]
    assert all(r.info.status == "FINISHED" for r in children), out[-3000:]
    assert sorted(r.info.run_name for r in children) == [f"method={m}" for m in ("ct", "dmd2", "lcd", "pcm", "tcd")]
    rc, out, stdout = command("report", [f"parent={parent.info.run_id}"], tmp_path)
    assert rc == 0, out[-3000:]
    folder = Path(stdout.strip().splitlines()[-1])
    rows = list(csv.DictReader(open(folder / "table.csv")))
    assert sorted(r["method"] for r in rows) == ["ct", "dmd2", "lcd", "pcm", "tcd"]
    assert (folder / "psnr_to_ref_vs_steps.png").stat().st_size > 15_000
    from lcm_exp.evaluation import report

    lines = report.steps_lines(report.find_runs(client, parent.info.run_id, None)[0], ["method"], "psnr_to_ref")
    assert sorted(lines) == ["method=ct", "method=dmd2", "method=lcd", "method=pcm", "method=tcd"]
    view = json.loads(client.get_experiment(parent.info.experiment_id).tags["mlflow.sharedViewState.lcm-exp"])
    assert "params.`method`" in json.dumps(view)


@pytest.mark.slow
def test_one_process_sweeps_any_key_mixed_precision_included(tmp_path, cache):
    """Hydra's basic launcher runs every job in one process: accelerate's process-wide state is reset between
    jobs, so a sweep over trainer.mixed_precision (and trainer.cpu) finishes both jobs."""
    rc, out, _ = lcm_exp(["-m", "trainer.mixed_precision=no,bf16", "trainer.cpu=true,false", *TINY,
                          "trainer.max_steps=1"], tmp_path, cache)
    assert rc == 0, out[-3000:]
    _, _, children = store(tmp_path)
    assert sorted((r.data.params["trainer.mixed_precision"], r.data.params["trainer.cpu"]) for r in children) == [
        ("bf16", "False"), ("bf16", "True"), ("no", "False"), ("no", "True")]
    assert all(r.info.status == "FINISHED" for r in children), out[-3000:]


@pytest.mark.slow
def test_joblib_sweep_then_report(tmp_path, cache):
    # +sweep=skip_k alone makes it a multirun (hydra.mode from the config group); the command line narrows k
    rc, out, _ = lcm_exp(["+sweep=skip_k", *TINY, *TINY_EVAL, "skip.k=10,20", "loss=l2,huber",
                          "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], tmp_path, cache)
    assert rc == 0, out[-3000:]
    client, parent, children = store(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert {(r.data.params["skip.k"], r.data.params["loss._target_"].rsplit(".", 1)[1]) for r in children} == \
        {(k, loss) for k in ("10", "20") for loss in ("l2", "huber")}
    assert all(r.info.status == "FINISHED" for r in children)

    rc, out, stdout = command("report", [f"parent={parent.info.run_id}"], tmp_path)
    assert rc == 0, out[-3000:]
    folder = Path(stdout.strip().splitlines()[-1])  # the last line printed is the report folder
    assert folder.is_dir() and folder.parent == tmp_path / "reports"
    rows = list(csv.DictReader(open(folder / "table.csv")))
    objective = "eval/student_2step/psnr_to_ref"
    assert len(rows) == 4 and {"skip.k", "loss", objective, "train/loss", "run_id"} <= set(rows[0])
    assert {(r["skip.k"], r["loss"]) for r in rows} == {(k, loss) for k in ("10", "20") for loss in ("l2", "huber")}
    values = [float(r[objective]) for r in rows]
    assert values == sorted(values, reverse=True)  # best first: psnr is maximised
    best = max(children, key=lambda r: r.data.metrics[objective])
    assert rows[0]["run_id"] == best.info.run_id
    md = (folder / "table.md").read_text()
    assert md.count("| FINISHED |") == 4 and "| rank | loss | skip.k |" in md and "(maximize)" in md
    pngs = {"metrics_vs_skip_k.png", "metrics_vs_loss.png", "loss_curves.png", "psnr_to_ref_vs_steps.png"}
    for name in pngs:
        assert (folder / name).stat().st_size > 15_000, name
    arts = artifact_paths(client, parent.info.run_id)
    assert {f"report/{n}" for n in pngs | {"table.md", "table.csv"}} <= arts
    assert client.get_run(parent.info.run_id).data.tags["lcm_exp.report"] == str(folder)

    # an experiment and an MLflow filter instead of a parent
    rc, out, stdout = command("report", ["experiment=lcm-distill", "filter=\"params.`skip.k` = '10'\"",
                                         f"out={tmp_path / 'k10'}"], tmp_path)
    assert rc == 0, out[-3000:]
    assert stdout.strip().splitlines()[-1] == str(tmp_path / "k10")
    rows = list(csv.DictReader(open(tmp_path / "k10" / "table.csv")))
    assert len(rows) == 2 and {r["loss"] for r in rows} == {"l2", "huber"} and "skip.k" not in rows[0]


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path, cache):
    rc, out, _ = lcm_exp(["-m", *TINY, "skip.k=10,20", "hydra/launcher=submitit_local"], tmp_path, cache)
    assert rc == 0, out[-3000:]
    client, parent, children = store(tmp_path)
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["skip.k"] for r in children) == ["10", "20"]
    for r in children:
        assert r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1, 2]
    assert len(list((tmp_path / "multirun").glob("*/*/.submitit/*"))) >= 2  # submitit ran the jobs


@pytest.mark.slow
def test_optuna_search_four_trials(tmp_path, cache):
    from omegaconf import OmegaConf

    rc, out, _ = lcm_exp(["+sweep=search", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                          "hydra/launcher=joblib", *TINY, *TINY_EVAL], tmp_path, cache)
    assert rc == 0, out[-3000:]
    client, parent, children = store(tmp_path)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    results = OmegaConf.load(next((tmp_path / "multirun").glob("*/*/optimization_results.yaml")))
    best = dict(results.best_params)
    assert set(best) == {"optim.lr", "loss.huber_c", "guidance.w_min", "guidance.w_max", "ema.decay"}
    assert 1e-5 <= best["optim.lr"] <= 1e-3 and 0.9 <= best["ema.decay"] <= 0.999
    objective = "eval/student_2step/psnr_to_ref"
    top = max(children, key=lambda r: r.data.metrics[objective])
    assert results.best_value == pytest.approx(top.data.metrics[objective])
    assert float(top.data.params["optim.lr"]) == pytest.approx(best["optim.lr"])
    tags = parent.data.tags
    assert tags["lcm_exp.best_value"] == str(results.best_value)
    assert f"ema.decay={best['ema.decay']}" in tags["lcm_exp.best_params"]
    assert "optimization_results.yaml" in artifact_paths(client, parent.info.run_id)
