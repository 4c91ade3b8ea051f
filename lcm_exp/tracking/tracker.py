"""MLflow tracking: the store, the run, params, tags, metrics and artifacts (DESIGN.md, Tracking contract).

Everything the training loop sends goes through a queue to one background sender thread, so a step never
waits on MLflow. A tracking server that goes away mid-run costs nothing: the sender keeps every point and
retries until the server is back; if it is still away when the run ends, the whole run (params, tags, every
metric point, artifacts) is written to a local sqlite store, named in the run's last log message.
Sweeps (`lcm-exp -m ...`) nest one child run per job under a parent run: see `lcm_exp.tracking.sweeps`.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline, its telemetry thread can crash the client

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
MAX_TAG_LEN = 5000
CUT_MARKER = "...[cut]"
PARENT_RUN_ENV = "LCM_EXP_PARENT_RUN_ID"  # set by the sweep callback, inherited by every job (joblib workers too)
FALLBACK_DB = "mlflow-offline.db"
# MLflow's UI shows an experiment of this kind as "Machine learning" (runs, charts) rather than GenAI (traces); the
# UI's own experiment-kind selector writes this tag. In MLflow 3.17 the sidebar's GenAI / Model training toggle
# decides the page too: `ui_url()` opens it on Model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow errors worth retrying (server away, overloaded, store locked); anything else is the request's fault.
_RETRYABLE = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ENDPOINT_NOT_FOUND",
              "DEADLINE_EXCEEDED", "ABORTED", "UNAVAILABLE"}


class TrackingUnavailable(ConfigError):
    """The tracking store cannot be reached when a run starts: a user's setting (or a server not started), told in
    one line, exit 2, before anything is built."""


def default_uri(start_dir: str | os.PathLike | None = None) -> str:
    """`sqlite:///` + the absolute path of mlflow.db in the folder the command started from."""
    return "sqlite:///" + str((Path(start_dir or os.getcwd()) / "mlflow.db").resolve())


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact(text: str) -> str:
    """Drops `user:password@` from URLs: credentials come from MLflow's env vars and are never logged."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1", text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(CUT_MARKER)] + CUT_MARKER


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"skip.k": "20", ...}; values over MLflow's limit are cut with a visible marker."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = _cut(redact(str(value)), MAX_PARAM_LEN)
    return out


def configure_http(uri: str) -> None:
    """MLflow retries a failed HTTP request for minutes by default; we retry in the sender thread instead, so a
    request fails in seconds. Users can still set these env vars themselves."""
    if is_remote(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def connect(uri: str, experiment: str):
    """(client, experiment id): checks the store is reachable (fails fast with what to do) and gets or creates
    the experiment (a model-training one, see EXPERIMENT_KIND), tolerating a parallel job creating it at the
    same time."""
    from mlflow.tracking import MlflowClient

    configure_http(uri)
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, TLS, auth, unreadable db ...
        raise TrackingUnavailable(
            f"Cannot reach the MLflow tracking store {redact(uri)}: {str(e).splitlines()[0][:300]}. "
            "Start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`) or fix tracking.uri; credentials "
            "come from MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN. To train without "
            "it, drop tracking.uri (local sqlite store mlflow.db in this folder) or set tracking.enabled=false."
        ) from None
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before we tagged them; a kind a user chose stays
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return client, exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts next to the database, not in ./mlruns of whichever cwd
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    try:
        return client, client.create_experiment(experiment, artifact_location=location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # noqa: BLE001 - created meanwhile by another job
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return client, exp.experiment_id


def run_params(config: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """(params, keys left out): the flattened config without the keys that do not apply to this run
    (`lcm_exp.tracking.applicability`), plus each group's option as a param of its own (`loss` = `huber`)."""
    from .applicability import not_applicable
    from .names import group_choices

    flat = flatten(config)
    choices = group_choices(flat)
    dropped = sorted(not_applicable(flat, choices))
    params = {k: v for k, v in flat.items() if k not in dropped}
    for group, option in choices.items():
        params.setdefault(group, option)
    return params, dropped


def ui_url(uri: str, experiment_id: str) -> str:
    """Where the runs of the experiment are, in `mlflow ui` (default port) or on the tracking server, opened
    on the Model training view with the comparison columns of `lcm_exp.tracking.view`."""
    from .view import SHARE_KEY

    base = redact(uri).rstrip("/") if is_remote(uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={SHARE_KEY}"


def _retryable(e: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return not isinstance(e, MlflowException) or str(getattr(e, "error_code", "")) in _RETRYABLE


class MLflowTracker:
    """One MLflow run per job; only the main process of a multi-process job talks to MLflow."""

    def __init__(self, uri: str | None, experiment: str, run_name: str | None, enabled: bool, flush_timeout: float,
                 retry_interval: float, validation_steps: list, validation_prompts: list, system_metrics: bool,
                 system_metrics_interval: float, start_dir: str | None = None):
        """`conf/tracking/mlflow.yaml` holds every value (its comments say what each does); `start_dir`: the folder
        the command started from (the default store's place)."""
        self.start_dir = Path(start_dir or os.getcwd())
        self.uri = uri or default_uri(self.start_dir)
        self.experiment, self.run_name, self.enabled = experiment, run_name, enabled
        self.flush_timeout, self.retry_interval = float(flush_timeout), float(retry_interval)
        self.validation_steps, self.validation_prompts = list(validation_steps), list(validation_prompts)
        self.system_metrics, self.system_metrics_interval = bool(system_metrics), float(system_metrics_interval)
        self._monitor = None
        self.experiment_id: str | None = None
        self.client = None
        self.run_id: str | None = None
        self.fallback_uri: str | None = None
        # what was logged, to rebuild the run in a local store if the server is away at the end
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._history: list = []
        self._artifacts: list[tuple[str, str | None]] = []
        self._queue: queue.Queue = queue.Queue()
        self._pending: list = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.caller_s = 0.0  # time the training loop spent in log_metrics (the overhead it sees)
        self.send_s = 0.0  # time the sender spent in MLflow calls (what a synchronous logger would cost the loop)
        self.n_calls = 0
        self._loop_span = (0.0, 0.0)  # perf_counter of the first and the last log_metrics call
        self.offline_since: float | None = None

    # ----------------------------------------------------------------------------------------------------- start
    def start(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
              run_id: str | None = None) -> str | None:
        """Starts (or, with `run_id`, continues) the run, logs the params (`run_params`), starts the sender and
        MLflow's system metrics monitor."""
        if not self.enabled:
            return None
        from mlflow.entities import Param

        from .names import run_name

        self.client, exp_id = connect(self.uri, self.experiment)
        self.experiment_id = exp_id
        self.run_name = self.run_name or redact(run_name())
        self._tags = {k: str(v) for k, v in (tags or {}).items()}
        self._params, dropped = run_params(params)
        if dropped:
            self._tags["lcm_exp.not_applicable"] = _cut(" ".join(dropped), MAX_TAG_LEN)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, run_name=self.run_name, tags=self._tags)
            self.run_id, self.run_name = run.info.run_id, run.info.run_name
            flat = [Param(k, v) for k, v in self._params.items()]
            for i in range(0, len(flat), 100):
                self.client.log_batch(self.run_id, params=flat[i:i + 100])
            from .view import share

            share(self.client, exp_id, params, self._params)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()
        if self.system_metrics:
            from .system_metrics import start_monitor

            self._monitor = start_monitor(self.run_id, self.uri, self.system_metrics_interval, resume=bool(run_id))
        log.info("MLflow run %s (%s) in experiment %r at %s", self.run_id, self.run_name, self.experiment,
                 redact(self.uri))
        return self.run_id

    # ------------------------------------------------------------------------------------------- non-blocking API
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queues the points (timestamped now) and returns at once."""
        if self.client is None:
            return
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        points = [(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._queue.put(("metrics", points))
        self._history.extend(points)
        self.n_calls += 1
        self._loop_span = (self._loop_span[0] or t0, t0)
        self.caller_s += time.perf_counter() - t0

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Queues a file or folder (it must stay in place until the run ends)."""
        if self.client is None:
            return
        item = (str(Path(path).resolve()), artifact_path)
        self._artifacts.append(item)
        self._queue.put(("artifact", item))

    def set_tag(self, key: str, value: str) -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queues tags (sent in order with the metrics)."""
        if self.client is None:
            return
        for key, value in tags.items():
            value = _cut(str(value), MAX_TAG_LEN)
            self._tags[key] = value
            self._queue.put(("tag", (key, value)))

    # --------------------------------------------------------------------------------------------------- sender
    def _send(self, kind: str, items: list) -> None:
        from mlflow.entities import Metric, RunTag

        t0 = time.perf_counter()
        if kind == "metrics":
            batch = [Metric(*p) for p in items]
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        elif kind == "tag":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in items])
        else:
            for path, artifact_path in items:
                if Path(path).is_dir():
                    self.client.log_artifacts(self.run_id, path, artifact_path)
                else:
                    self.client.log_artifact(self.run_id, path, artifact_path)
        self.send_s += time.perf_counter() - t0

    def _take(self, kind: str, item) -> None:
        """Into the pending list, in order; consecutive metrics (or tags) merge into one batch."""
        if self._pending and self._pending[-1][0] == kind and kind != "artifact":
            self._pending[-1][1].extend(item if kind == "metrics" else [item])
        else:
            self._pending.append((kind, list(item) if kind == "metrics" else [item]))

    def _drain(self) -> None:
        while True:
            try:
                self._take(*self._queue.get_nowait())
            except queue.Empty:
                return

    def _send_loop(self) -> None:
        while True:
            try:
                self._take(*self._queue.get(timeout=0.2))
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            self._drain()
            while self._pending:
                kind, items = self._pending[0]
                try:
                    self._send(kind, items)
                except Exception as e:  # noqa: BLE001
                    if not _retryable(e):
                        log.error("MLflow rejected %s %s: %s", kind, items[:3], e)
                        self._pending.pop(0)
                        continue
                    if self.offline_since is None:
                        self.offline_since = time.time()
                        log.warning("MLflow store %s unreachable (%s); training goes on, metrics are kept and "
                                    "sent when it is back", redact(self.uri), str(e).splitlines()[0][:200])
                    if self._stop.wait(self.retry_interval) and self._abandon:
                        return
                    self._drain()
                    continue
                self._pending.pop(0)
                if self.offline_since is not None:
                    log.warning("MLflow store %s is back after %.0f s; buffered metrics sent", redact(self.uri),
                                time.time() - self.offline_since)
                    self.offline_since = None

    _abandon = False

    def unsent(self) -> int:
        """Metric points not yet accepted by the store."""
        return sum(len(items) for kind, items in list(self._pending) if kind == "metrics") + \
            sum(len(item) for kind, item in list(self._queue.queue) if kind == "metrics")

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until everything queued is sent; False if that did not happen within `timeout` s."""
        deadline = time.time() + (self.flush_timeout if timeout is None else timeout)
        while time.time() < deadline:
            if self._queue.empty() and not self._pending and (self._thread is None or self._thread.is_alive()):
                time.sleep(0.05)  # an item taken but not yet in _pending
                if self._queue.empty() and not self._pending:
                    return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------------------------------------------- end
    def end(self, status: str = "FINISHED", error: BaseException | str | None = None) -> None:
        """Flushes, ends the run with `status` (keeping `error` on it as tag and artifact), stops the sender.
        If the server is still away, writes the whole run to a local sqlite store and says where."""
        if self.client is None:
            return
        if error is not None:
            text = error if isinstance(error, str) else "".join(traceback.format_exception(error))
            self.set_tag("lcm_exp.error", text[-MAX_TAG_LEN:])
            err_file = Path(tempfile.mkdtemp(prefix="lcm_exp-")) / "error.txt"
            try:
                err_file.write_text(text)
                self.log_artifact(err_file)
            except OSError:
                pass
        span = self._loop_span[1] - self._loop_span[0]
        if self.n_calls > 1 and span > 0:
            log.info("tracking overhead: %d log_metrics calls took %.2f ms in the training loop = %.3f%% of its %.1f s "
                     "(the sender spent %.0f ms in MLflow calls = %.1f%%, what synchronous logging would have cost)",
                     self.n_calls, 1000 * self.caller_s, 100 * self.caller_s / span, span, 1000 * self.send_s,
                     100 * self.send_s / span)
        if self._monitor is not None:
            from .system_metrics import stop_monitor

            stop_monitor(self._monitor)
            self._monitor = None
        sent = self.flush()
        self._abandon = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        if sent:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as e:  # noqa: BLE001
                sent = False
                log.warning("could not end run %s: %s", self.run_id, e)
        if not sent:
            self._write_fallback(status)
        else:
            log.info("compare runs: %s%s", "" if is_remote(self.uri) else
                     f"mlflow ui --backend-store-uri {redact(self.uri)}  then open ", ui_url(self.uri, self.experiment_id))
        self.client = None

    def _write_fallback(self, status: str) -> None:
        from mlflow.entities import Metric, Param, RunTag

        n = self.unsent()
        self.fallback_uri = "sqlite:///" + str((self.start_dir / FALLBACK_DB).resolve())
        client, exp_id = connect(self.fallback_uri, self.experiment)
        tags = {**self._tags, "lcm_exp.remote_uri": redact(self.uri), "lcm_exp.remote_run_id": str(self.run_id)}
        run = client.create_run(exp_id, run_name=self.run_name, tags=tags)
        rid = run.info.run_id
        params = [Param(k, v) for k, v in self._params.items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i:i + 100])
        metrics = [Metric(*p) for p in self._history]
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        for path, artifact_path in self._artifacts:
            if Path(path).is_dir():
                client.log_artifacts(rid, path, artifact_path)
            elif Path(path).exists():
                client.log_artifact(rid, path, artifact_path)
        client.log_batch(rid, tags=[RunTag("lcm_exp.unsent_points", str(n))])
        client.set_terminated(rid, status=status)
        log.warning("MLflow store %s still unreachable at the end of run %s: %d metric points were not sent. The "
                    "whole run (params, tags, all %d metric points, artifacts) is in the local store %s as run %s; "
                    "browse it with `mlflow ui --backend-store-uri %s`.", redact(self.uri), self.run_id, n,
                    len(self._history), self.fallback_uri, rid, self.fallback_uri)
