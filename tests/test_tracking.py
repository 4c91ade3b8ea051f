"""Unit tests of lcm_exp.tracking.tracker: params, redaction, git tags, the non-blocking sender, errors, fail-fast."""
from __future__ import annotations

import os
import socket
import time

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from lcm_exp.tracking import tracker as tracking  # noqa: E402
from lcm_exp.tracking.tracker import CUT_MARKER, MAX_PARAM_LEN, TrackingUnavailable, flatten  # noqa: E402
from parts import part  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flatten_dotted_keys_and_cut_with_marker():
    flat = flatten({"skip": {"k": 20}, "eval": {"steps": [1, 2]}, "empty": {}, "long": "x" * (MAX_PARAM_LEN + 50)})
    assert flat["skip.k"] == "20" and flat["eval.steps"] == "[1, 2]" and flat["empty"] == "{}"
    assert len(flat["long"]) == MAX_PARAM_LEN and flat["long"].endswith(CUT_MARKER)
    assert flat["long"].startswith("x" * 100)
    assert flatten({"a": "y" * MAX_PARAM_LEN})["a"] == "y" * MAX_PARAM_LEN  # at the limit: untouched


def test_credentials_in_uris_are_redacted():
    flat = flatten({"tracking": {"uri": "https://alice:s3cret@mlflow.example.com/"}})
    assert flat["tracking.uri"] == "https://mlflow.example.com/"
    assert "s3cret" not in tracking.redact("tracking.uri=http://bob:s3cret@host:5000 x=1")


def test_git_tags_of_this_checkout_and_of_a_plain_folder(tmp_path):
    from lcm_exp.tracking.provenance import git_tags

    assert git_tags(tmp_path) == {}  # not a checkout: skipped, no error
    tags = git_tags()
    if not tags:
        pytest.skip("lcm_exp is not installed from a git checkout here")
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["lcm_exp.git.dirty"] in ("true", "false")


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_sqlite_run_params_tags_metrics_and_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-do-not-log")
    t = part("tracking", "mlflow", experiment="unit", start_dir=str(tmp_path))
    assert t.uri == "sqlite:///" + str((tmp_path / "mlflow.db").resolve())
    run_id = t.start({"optim": {"lr": 1e-4}, "note": "n" * 7000}, tags={"host": "h"})
    for step in range(1, 6):
        t.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-4}, step)
    (tmp_path / "a.txt").write_text("hello")
    t.log_artifact(tmp_path / "a.txt", "files")
    t.end("FAILED", error=RuntimeError("boom in step 5"))

    c = _client(t.uri)
    run = c.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["optim.lr"] == "0.0001" and run.data.params["note"].endswith(CUT_MARKER)
    assert "boom in step 5" in run.data.tags["lcm_exp.error"] and run.data.tags["host"] == "h"
    assert [m.step for m in c.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5]
    assert c.get_metric_history(run_id, "train/loss")[-1].value == pytest.approx(0.2)
    names = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "files")}
    assert {"error.txt", "files/a.txt"} <= names
    everything = str(run.data.params) + str(run.data.tags)
    assert "tok-do-not-log" not in everything
    # the experiment's artifacts sit next to the database, not in ./mlruns of some cwd
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_log_metrics_never_waits_on_mlflow(tmp_path, monkeypatch):
    t = part("tracking", "mlflow", experiment="unit", start_dir=str(tmp_path), flush_timeout=20)
    run_id = t.start({"a": 1})
    real_send = t._send

    def slow_send(kind, items):
        time.sleep(0.5)  # a slow server
        real_send(kind, items)

    monkeypatch.setattr(t, "_send", slow_send)
    t0 = time.perf_counter()
    for step in range(1, 21):
        t.log_metrics({"train/loss": float(step), "train/step_time_ms": 10.0}, step)
    assert time.perf_counter() - t0 < 0.2  # 20 calls, each would cost 0.5 s if synchronous
    t.end()
    assert t.fallback_uri is None
    assert [m.step for m in _client(t.uri).get_metric_history(run_id, "train/loss")] == list(range(1, 21))


def test_unreachable_server_fails_fast_with_what_to_do(tmp_path, monkeypatch):
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    t = part("tracking", "mlflow", uri=f"http://127.0.0.1:{free_port()}", start_dir=str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(TrackingUnavailable) as err:
        t.start({"a": 1})
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "Cannot reach the MLflow tracking store" in msg and "tracking.uri" in msg and "tracking.enabled=false" in msg


def test_disabled_tracker_does_nothing(tmp_path):
    t = part("tracking", "mlflow", enabled=False, start_dir=str(tmp_path))
    assert t.start({"a": 1}) is None
    t.log_metrics({"train/loss": 1.0}, 1)
    t.end()
    assert not (tmp_path / "mlflow.db").exists()
