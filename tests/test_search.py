"""A search that scales out (issue 17, item 4): `lcm-exp +sweep=search` workers share one persistent Optuna study
(the default journal file), a killed search resumes where it stopped, and every trial is an MLflow child of the
study's one parent run. Real `lcm-exp` processes on the tiny random teacher: one training step per trial, the
objective is the final train/loss (eval disabled), minimised."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = ["teacher=tiny_random", "data.num_samples=200", "data.resolution=32", "trainer.batch_size=2",
       "trainer.max_steps=1", "eval.enabled=false", "export.enabled=false", "tracking.validation_steps=[1]"]
STUDY = "lcm-exp-search"  # sweeps/search.yaml's default study, in ./optuna-journal.log


def test_search_space_from_hydra_sweep_syntax():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from lcm_exp.tracking.study import search_space

    space, fixed = search_space(["optim.lr=tag(log, interval(1e-5, 1e-3))", "ema.decay=interval(0.9, 0.999)",
                                 "skip.k=range(5, 25, 5)", "loss=l2,huber", "trainer.max_steps=3",
                                 "+sweep=search", "ema.decay=0.95", "guidance.w_max=interval(6, 15)",
                                 "guidance.w_min=int(interval(1, 5))"])
    assert space == {"optim.lr": ("optim.lr", FloatDistribution(1e-5, 1e-3, log=True)),
                     "skip.k": ("skip.k", IntDistribution(5, 20, step=5)),  # range excludes its end
                     "loss": ("loss", CategoricalDistribution(["l2", "huber"])),
                     "guidance.w_max": ("guidance.w_max", FloatDistribution(6.0, 15.0)),  # Hydra: floats
                     "guidance.w_min": ("guidance.w_min", IntDistribution(1, 5))}  # unless cast
    assert fixed == ["trainer.max_steps=3", "+sweep=search", "ema.decay=0.95"]  # a later value wins


# ------------------------------------------------------------------------------------------- real workers
def env():
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def start_worker(cwd: Path, cache: Path, n_trials: int, log: Path) -> subprocess.Popen:
    """One search worker, in its own process group (so that it can be killed whole, as a node dies)."""
    args = ["+sweep=search", f"hydra.sweeper.n_trials={n_trials}", *JOB, f"teacher.cache_dir={cache}",
            f"data.cache_dir={cache}"]
    return subprocess.Popen([sys.executable, "-c", "from lcm_exp.cli import train; train()", *args], cwd=cwd,
                            env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(workers: dict[Path, subprocess.Popen], timeout: float = 240) -> None:
    for log, p in workers.items():
        assert p.wait(timeout=timeout) == 0, log.read_text()[-4000:]


def load_study(cwd: Path):
    import optuna

    from lcm_exp.tracking.study import open_storage

    return optuna.load_study(study_name=STUDY, storage=open_storage("optuna-journal.log", cwd))


def running_child_job(cwd: Path) -> int | None:
    """The job number of a child run RUNNING in the MLflow store (read with sqlite3: cheap enough to poll)."""
    db = cwd / "mlflow.db"
    if not db.exists():
        return None
    with sqlite3.connect(db, timeout=5) as con:
        try:
            row = con.execute("SELECT t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                              "WHERE r.status = 'RUNNING' AND t.key = 'hydra.job.num'").fetchone()
        except sqlite3.OperationalError:  # tables not created yet
            return None
    return int(row[0]) if row else None


@pytest.mark.slow
def test_two_workers_six_trials_killed_resumed_to_eight(tmp_path):
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf
    from optuna.trial import TrialState

    from lcm_exp.tracking.study import OWNER, RETRY_OF, STALE, SURPLUS

    cache = tmp_path / "cache"
    # 1. two workers started together, one study, a budget of 6 trials
    finish({tmp_path / f"w{i}.log": start_worker(tmp_path, cache, 6, tmp_path / f"w{i}.log") for i in (1, 2)})
    first = load_study(tmp_path).get_trials()
    done = [t for t in first if t.state == TrialState.COMPLETE]
    assert len(done) == 6 and all(t.user_attrs.get(SURPLUS) for t in first if t not in done)
    assert len({t.user_attrs[OWNER]["pid"] for t in done}) == 2  # both workers ran trials of the one study
    assert len({t.params["optim.lr"] for t in done}) == 6  # seeded per trial: the workers never repeat each other

    # 2. the budget raised to 8; the worker is killed (SIGKILL, its whole group) while a trial runs
    log = tmp_path / "killed.log"
    victim = start_worker(tmp_path, cache, 8, log)
    deadline = time.monotonic() + 180
    while (killed := running_child_job(tmp_path)) is None:
        assert victim.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert load_study(tmp_path).trials[killed].state == TrialState.RUNNING  # left RUNNING: nobody will tell it

    # 3. resumed by two workers: the dead worker's trial is failed and re-run, the study ends at 8
    finish({tmp_path / f"r{i}.log": start_worker(tmp_path, cache, 8, tmp_path / f"r{i}.log") for i in (1, 2)})
    trials = load_study(tmp_path).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == 8 and len(complete) + len(failed) == len(trials)  # nothing RUNNING or WAITING
    assert [t.number for t in failed if not t.user_attrs.get(SURPLUS)] == [killed]
    assert trials[killed].user_attrs[STALE] and killed >= 6
    (rerun,) = [t for t in complete if t.user_attrs.get(RETRY_OF) == killed]
    assert rerun.params == trials[killed].params and rerun.number > killed

    # MLflow: one parent run (the study's), every trial's job a child; the killed one's run ended FAILED
    client = MlflowClient("sqlite:///" + str(tmp_path / "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("lcm-distill").experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("lcm_exp.sweep") == "parent"]
    children = {int(r.data.tags["hydra.job.num"]): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == len(children) + 1 and parent.info.status == "FINISHED"
    assert parent.info.run_name == f"search {STUDY}" and parent.data.tags["lcm_exp.study"] == STUDY
    assert set(children) == {t.number for t in complete} | {killed}
    assert children.pop(killed).info.status == "FAILED"
    for t in complete:
        run = children[t.number]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["train/loss"] == pytest.approx(t.value, rel=1e-6)
        assert float(run.data.params["optim.lr"]) == pytest.approx(t.params["optim.lr"], rel=1e-9)
        folder = tmp_path / "multirun" / "search" / STUDY / f"trial_{t.number}"  # distinct per trial, any worker
        assert Path(run.data.tags["lcm_exp.output_dir"]).is_relative_to(folder)
        assert (folder / ".hydra" / "overrides.yaml").is_file()

    # the best trial, in optimization_results.yaml and on the parent run
    best = min(complete, key=lambda t: t.value)
    results = OmegaConf.load(tmp_path / "multirun" / "search" / STUDY / "optimization_results.yaml")
    assert results.best_trial == best.number and results.best_value == best.value and results.n_complete == 8
    assert dict(results.best_params) == best.params and results.direction == "minimize"
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags["lcm_exp.best_value"] == str(best.value)
    assert f"optim.lr={best.params['optim.lr']}" in tags["lcm_exp.best_params"]
