"""Against a real `mlflow server` that the test starts on a free loopback port and stops itself: a run that
logs there, the server killed and restarted mid-run with every metric point present afterwards, and a server
still away at the end (the run written to a local store that the last log message names)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from test_tracking_runs import FAST, REPO, lcm_exp_cache  # noqa: F401 - the shared cache fixture

pytestmark = pytest.mark.slow


class MLflowServer:
    """`mlflow server` with a sqlite store and an artifact folder in tmp; stop() and start() again keep both."""

    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.root, self.proc = root, None

    def start(self, timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not start in {timeout} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group it started (uvicorn workers): a crash
        self.proc.wait(timeout=30)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch_module.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = MLflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_server_killed_and_restarted_mid_run_loses_no_metric(mlflow_server, tmp_path, lcm_exp_cache):  # noqa: F811
    steps = 8
    exe = [sys.executable, "-c", "from lcm_exp.cli import train; train()"]
    args = [*FAST, f"trainer.max_steps={steps}", "trainer.log_every=1", f"tracking.uri={mlflow_server.uri}",
            "tracking.flush_timeout=240", "tracking.retry_interval=0.5", "tracking.experiment=outage",
            f"teacher.cache_dir={lcm_exp_cache}", f"data.cache_dir={lcm_exp_cache}"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(exe + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()

    def wait_for(text, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in lines):
                return
            assert proc.poll() is None or any(text in line for line in lines), "".join(lines)[-3000:]
            time.sleep(0.2)
        raise TimeoutError(f"{text!r} not seen:\n" + "".join(lines)[-3000:])

    try:
        wait_for("step 2/")
        mlflow_server.stop()
        wait_for("unreachable")  # the sender noticed; training goes on
        wait_for(f"step {steps}/{steps}")  # trained to the end while the server was away
        mlflow_server.start()
        assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert "is back" in out and "mlflow-offline.db" not in out

    client = mlflow_server.client()
    exp = client.get_experiment_by_name("outage")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/step_time_ms"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == list(range(1, steps + 1)), name
    assert run.data.params["trainer.max_steps"] == str(steps)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, f"validation/step_{steps:06d}")}
    assert arts == {f"validation/step_{steps:06d}/student.png", f"validation/step_{steps:06d}/target.png"}


def test_server_away_at_the_end_writes_a_local_store(mlflow_server, tmp_path, caplog):
    """Last: leaves the server stopped."""
    from mlflow.tracking import MlflowClient

    from parts import part

    t = part("tracking", "mlflow", uri=mlflow_server.uri, experiment="fallback", start_dir=str(tmp_path), flush_timeout=2,
                      retry_interval=0.2)
    remote_id = t.start({"optim": {"lr": 0.001}}, tags={"host": "h"})
    t.log_metrics({"train/loss": 1.0}, 1)
    assert t.flush(30)
    assert [m.step for m in mlflow_server.client().get_metric_history(remote_id, "train/loss")] == [1]
    mlflow_server.stop()
    for step in range(2, 6):
        t.log_metrics({"train/loss": 1.0 / step}, step)
    with caplog.at_level(logging.WARNING, logger="lcm_exp.tracking.tracker"):
        t.end("FINISHED")
    local = "sqlite:///" + str((tmp_path / "mlflow-offline.db").resolve())
    assert t.fallback_uri == local
    assert local in caplog.records[-1].getMessage() and "4 metric points were not sent" in caplog.records[-1].getMessage()
    client = MlflowClient(local)
    (run,) = client.search_runs([client.get_experiment_by_name("fallback").experiment_id])
    assert run.data.tags["lcm_exp.remote_run_id"] == remote_id and run.info.run_name == t.run_name
    assert run.data.params["optim.lr"] == "0.001" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5]
