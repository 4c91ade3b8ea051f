"""Measures what issue 26 asks of a run at scale, on real `lcm-exp` processes over LAION-sized samples (~100 KB:
a 32 px PNG and 100 KB of other bytes per sample, as an image of that size would be, cheap to decode):

  reads   the shard bytes all processes of a run read (`data/read_mb`, every rank's and loader worker's), for
          1 process, 2 ranks, and 2 ranks x 2 loader workers, the same steps and global batch;
  resume  the time from a resumed process's start to its first trained step, after 20 and after 2,000 steps
          (the samples taken before do not count: only the lanes' buffers and the shards in flight are read).

    python scripts/measure_scale.py reads resume      # (both: ~10 minutes on 2 cores)

Prints one JSON line per measurement."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

SHARDS, PER_SHARD, PAD = 16, 100, 100_000
TINY = ["teacher=tiny_random", "data=webdataset", "data.resolution=32", "trainer.batch_size=4", "trainer.log_every=1",
        "trainer.progress_bar=false", "eval.enabled=false", "export.enabled=false", "tracking.system_metrics=false"]
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def shards(root: Path) -> str:
    import webdataset as wds
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for s in range(SHARDS):
        with wds.TarWriter(str(root / f"laion-{s:05d}.tar")) as w:
            for i in range(PER_SHARD):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), ((7 * i) % 256, (13 * s) % 256, 90)).save(buf, format="PNG")
                w.write({"__key__": f"{s:05d}{i:04d}", "png": buf.getvalue(), "txt": f"a square {i} of shard {s}",
                         "pad": os.urandom(PAD)})
    return str(root / f"laion-{{00000..{SHARDS - 1:05d}}}.tar")


def run(args, cwd: Path, ranks: int = 1) -> subprocess.CompletedProcess:
    main = "import sys; from lcm_exp.cli import train; sys.argv[0] = 'lcm-exp'; train()"
    cmd = ([sys.executable, "-c", main] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "lcm_exp"])
    r = subprocess.run([*cmd, *args], cwd=cwd, env=ENV, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-3000:])
    return r


def last_metric(cwd: Path, name: str) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("lcm-distill").experiment_id])
    return r.data.metrics[name]


def reads(urls: str, work: Path) -> None:
    steps, out = 50, {}
    for name, ranks, workers in (("1 process", 1, 0), ("2 ranks", 2, 0), ("2 ranks x 2 workers", 2, 2)):
        cwd = work / f"reads-{ranks}-{workers}"
        cwd.mkdir()
        run([*TINY, f"data.urls='{urls}'", f"trainer.max_steps={steps}", f"data.num_workers={workers}"], cwd, ranks)
        out[name] = last_metric(cwd, "data/read_mb")
    consumed = steps * 4 * (PAD + 1000) / 2 ** 20
    print(json.dumps({"measure": "reads", "steps": steps, "global_batch": 4, "consumed_mb": round(consumed, 1),
                      "read_mb": {k: round(v, 1) for k, v in out.items()},
                      "ratio_to_1_process": {k: round(v / out["1 process"], 3) for k, v in out.items()}}))


def first_step_after(log: str, t0: float, step: int) -> float:
    m = re.search(rf"^\[([\d\-: ,]+)\]\[lcm_exp\.train\.trainer\]\[INFO\] - step {step}/", log, re.M)
    when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return when - t0


def resume(urls: str, work: Path, repeats: int = 3) -> None:
    """Each checkpoint resumed `repeats` times, the two interleaved (the machine's speed drifts)."""
    args = [*TINY, f"data.urls='{urls}'", "data.num_workers=0"]
    for steps in (20, 2000):
        (work / f"resume-{steps}").mkdir()
        run([*args, f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}"], work / f"resume-{steps}")
    out = {20: [], 2000: []}
    for _ in range(repeats):
        for steps in (20, 2000):
            t0 = time.time()
            r = run([*args, f"trainer.max_steps={steps + 1}", "trainer.checkpoint_every=0", "trainer.resume=latest"],
                    work / f"resume-{steps}")
            log = r.stdout + r.stderr
            lanes = re.search(r"data: (\d+) lanes resumed: (\d+) buffered samples read back \(([\d.]+) MB, "
                              r"([\d.]+) s\)", log)
            out[steps].append({"start_to_first_step_s": round(first_step_after(log, t0, steps + 1), 2),
                               "lanes_read_back_mb": float(lanes.group(3)), "lanes_read_back_s": float(lanes.group(4))})
    print(json.dumps({"measure": "resume", "samples_of_100kb_taken": {k: k * 4 for k in out}, "after": out}))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="lcm-scale-") as tmp:
        work = Path(tmp)
        urls = shards(work / "shards")
        for what in sys.argv[1:] or ["reads", "resume"]:
            {"reads": reads, "resume": resume}[what](urls, work)
