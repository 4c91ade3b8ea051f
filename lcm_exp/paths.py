"""Where the package's configuration lives: `conf/` and `sweeps/` of a checkout, or `lcm_exp/conf` and
`lcm_exp/sweeps` of a wheel install (symbolic links in the checkout, copies in the wheel: pyproject.toml)."""
from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    return str((Path(__file__).parent / "conf").resolve())


def sweeps_dir() -> Path:
    return (Path(__file__).parent / "sweeps").resolve()
