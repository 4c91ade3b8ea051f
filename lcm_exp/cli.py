"""Entry points: compose the config with Hydra, call the runner, return its metric. Nothing else."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def config_dir() -> str:
    """`conf/` of a checkout, or `lcm_exp/conf` of a wheel install (the same files, see pyproject.toml)."""
    return str((Path(__file__).parent / "conf").resolve())


def _main(config_name: str, task):
    import hydra

    from .config import register

    register()
    return hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(task)()


def _train(cfg):
    from .config import ConfigError
    from .runner import run

    try:
        return run(cfg)
    except ConfigError as e:  # a user's value that cannot work: the message says what to do, no traceback
        print(f"lcm-exp: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def train():
    """`lcm-exp [overrides]`: the main job."""
    return _main("config", _train)


def build_teacher():
    """`lcm-exp-build-teacher [--out DIR] [--force] [overrides]`: build, measure and cache the tiny teacher."""
    from .teachers.tiny import main

    main()
