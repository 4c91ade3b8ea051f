"""Where a run comes from, as MLflow tags: the lcm_exp checkout's commit, Hydra's overrides and job, the host, the
library versions, and the sweep it belongs to."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from .tracker import MAX_TAG_LEN, PARENT_RUN_ENV, _cut, redact


def git_tags(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Commit and dirty flag of the lcm_exp source checkout; {} when it is not one (a wheel install)."""
    root = Path(path) if path else Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return {}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"mlflow.source.git.commit": git("rev-parse", "HEAD"), "lcm_exp.git.dirty": str(dirty).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


def run_tags() -> dict[str, str]:
    """Provenance tags: git, Hydra overrides / job name / sweep, host, library versions."""
    import diffusers
    import torch
    from hydra.core.hydra_config import HydraConfig

    import lcm_exp

    tags = {"lcm_exp.version": lcm_exp.__version__, "torch.version": torch.__version__,
            "diffusers.version": diffusers.__version__, "host": socket.gethostname(), **git_tags()}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        tags["hydra.overrides"] = redact(" ".join(hc.overrides.task)) or "(none)"
        tags["hydra.job.name"] = hc.job.name
        tags["hydra.mode"] = str(getattr(hc.mode, "name", hc.mode))
        if tags["hydra.mode"].endswith("MULTIRUN"):
            tags["hydra.job.num"] = str(hc.job.num)
            tags["hydra.sweep.dir"] = str(Path(hc.sweep.dir).resolve())
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
        tags["lcm_exp.sweep_id"] = os.environ[PARENT_RUN_ENV]
    return {k: _cut(str(v), MAX_TAG_LEN) for k, v in tags.items()}
