"""The time from a preemption signal to the process's exit for an SD-1.5-shaped full student (the `sd15_random`
teacher: SD-1.5's UNet, VAE and text encoder layouts with random weights, 0.86 B UNet parameters), trained on this
machine: SIGTERM `LCM_EXP_SIGNAL_DELAY` seconds (default 1: the next step is in flight) after step 1 is logged;
the run finishes that step, writes its checkpoint (student, EMA, AdamW state: ~14 GB), fsyncs and checksums it,
and exits 75. With a delay of 0 the signal lands at the step boundary: the checkpoint alone.

    python scripts/measure_preemption.py [overrides]      # prints one JSON line

Defaults: 64 px, batch 1, bf16 (the teacher and the EMA's forward copy in bf16: what fits 24 GB of RAM)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["teacher=sd15_random", "data.resolution=64", "trainer.batch_size=1", "trainer.mixed_precision=bf16",
        "trainer.max_steps=100", "trainer.log_every=1", "trainer.progress_bar=false", "eval.enabled=false",
        "export.enabled=false", "tracking.system_metrics=false", "tracking.validation_steps=[]"]

if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="lcm-preempt-", dir=os.environ.get("TMPDIR", "/tmp")) as cwd:
        main = "import sys; from lcm_exp.cli import train; sys.argv[0] = 'lcm-exp'; train()"
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen([sys.executable, "-c", main, *ARGS, *sys.argv[1:]], cwd=cwd, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t_start, lines, step_times = time.monotonic(), [], []
        for line in p.stdout:
            lines.append(line)
            if " - step " in line:
                step_times.append(time.monotonic())
                time.sleep(float(os.environ.get("LCM_EXP_SIGNAL_DELAY", "1")))
                p.send_signal(signal.SIGTERM)
                t_signal = time.monotonic()
                break
        out = "".join(lines) + p.communicate(timeout=900)[0]
        t_exit = time.monotonic()
        ckpt = next(Path(cwd).glob("outputs/*/*/checkpoints/checkpoint-*"), None)
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) if ckpt else 0
        stopped = [ln for ln in out.splitlines() if "preempted by SIGTERM at step" in ln]
        print(json.dumps({"exit_code": p.returncode, "signal_to_exit_s": round(t_exit - t_signal, 1),
                          "start_to_first_step_s": round(step_times[0] - t_start, 1),
                          "checkpoint": ckpt.name if ckpt else None, "checkpoint_gb": round(size / 1e9, 2),
                          "stopped": stopped[-1] if stopped else out[-1500:]}))
