"""Helpers of the tests that run real `lcm-exp` processes: start one, stop it at a step, read its MLflow store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

# A tiny real job: the random SD-shaped teacher, 32 px shapes, a step per log line.
TINY = ["teacher=tiny_random", "data.resolution=32", "trainer.batch_size=4",
        "trainer.log_every=1", "trainer.progress_bar=false", "eval.enabled=false", "export.enabled=false"]
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MAIN = "import sys; from lcm_exp.cli import train; sys.argv[0] = 'lcm-exp'; train()"


def command(args) -> list[str]:
    return [sys.executable, "-c", MAIN, *args]


def lcm_exp(args, cwd, expect: int | None = 0, timeout: int = 600, env: dict | None = None):
    """Runs `lcm-exp ARGS` in `cwd` to its end (`env`: more environment); checks its exit code (None: any)."""
    r = subprocess.run(command(args), cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if expect is not None:
        assert r.returncode == expect, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r


def stop_at(args, cwd, step: int, sig=signal.SIGKILL, after_logged: int | None = None, timeout: int = 300,
            group: bool = False):
    """Starts `lcm-exp ARGS`, sends `sig` once its log shows `step N/` for N >= `step` (and, when given, once the
    MLflow store holds train/loss at step `after_logged`, so that no earlier point is lost with the process) -- to
    its whole process group with `group` (its DataLoader workers too, as SLURM does); returns (exit code,
    output)."""
    p = subprocess.Popen(command(args), cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=group)
    lines, deadline = [], time.monotonic() + timeout
    for line in p.stdout:
        lines.append(line)
        if " - step " in line and int(line.split(" - step ")[1].split("/")[0]) >= step:
            if after_logged is not None:
                wait_for_point(cwd, after_logged, deadline)
            os.killpg(p.pid, sig) if group else p.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(lines[-50:])
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, "".join(lines) + out


def wait_for_point(cwd, step: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            history, _ = loss_history(cwd)
            if step in history:
                return
        except Exception:  # noqa: BLE001 - the store may be mid-write
            pass
        time.sleep(0.05)


def only_run(cwd):
    client = MlflowClient(f"sqlite:///{Path(cwd) / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lcm-distill")
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def loss_history(cwd) -> tuple[dict[int, set[float]], object]:
    """{step: every train/loss value logged at that step} of the store's only run, and the run."""
    client, run = only_run(cwd)
    out: dict[int, set[float]] = {}
    for m in client.get_metric_history(run.info.run_id, "train/loss"):
        out.setdefault(m.step, set()).add(m.value)
    return out, run


def final_weights(cwd) -> dict[str, torch.Tensor]:
    """The student's and the target's weights the newest finished run saved (student_unet/, target_unet/)."""
    from safetensors.torch import load_file

    folder = max((p.parent for p in Path(cwd).glob("outputs/*/*/student_unet")), key=lambda p: p.stat().st_mtime)
    return {f"{sub}/{k}": v for sub in ("student_unet", "target_unet")
            for k, v in load_file(folder / sub / "diffusion_pytorch_model.safetensors").items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_every_weight_close(a: dict, b: dict, most: float = 1e-6, bound: float = 2e-3, share: float = 1e-3) -> None:
    """Every parameter of two runs' weights agrees: no element differs by more than `bound`; of all elements, at
    most `share` differ by more than `most`; and in no tensor do a quarter of them. (AdamW's first steps move a
    weight whose gradient is ~0 by about ±lr whichever way float rounding tips it, so a few elements -- one of a
    64-element norm weight -- may differ by a few lr; a real difference moves most elements of a tensor.)"""
    assert a.keys() == b.keys()
    differ = total = 0
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        assert d.max().item() <= bound, (k, d.max().item())
        n = int((d > most).sum())
        assert n < 0.25 * d.numel(), (k, n, d.numel())
        differ, total = differ + n, total + d.numel()
    assert differ <= share * total, (differ, total)