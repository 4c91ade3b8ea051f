"""Where the package's configuration lives, and what an option file of a config group says.

`conf/` and `sweeps/` sit at the top of a checkout; `lcm_exp/conf` and `lcm_exp/sweeps` are symbolic links to
them there, and copies in a wheel (pyproject.toml), so both find them at the same place.

`MOVED` lists the `_target_` modules of the flat layout before 0.2 (`lcm_exp.losses.l2` is now
`lcm_exp.distill.losses.l2`): a user's YAML or a stored run config that names an old path still works, with a
deprecation warning, until 0.3 (CHANGELOG.md).
"""
from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parents[1]
TARGET = "_target_"
MOVED = {
    "lcm_exp.lcd": "lcm_exp.distill.step", "lcm_exp.methods": "lcm_exp.distill.methods",
    "lcm_exp.solvers": "lcm_exp.distill.solvers", "lcm_exp.skip": "lcm_exp.distill.skip",
    "lcm_exp.losses": "lcm_exp.distill.losses", "lcm_exp.guidance": "lcm_exp.distill.guidance",
    "lcm_exp.schedules": "lcm_exp.distill.schedules", "lcm_exp.ema": "lcm_exp.distill.ema",
    "lcm_exp.trainer": "lcm_exp.train.trainer", "lcm_exp.optim": "lcm_exp.train.optim",
    "lcm_exp.tracking": "lcm_exp.tracking.tracker", "lcm_exp.sweep_tracking": "lcm_exp.tracking.sweeps",
    "lcm_exp.evaluation": "lcm_exp.evaluation.evaluator", "lcm_exp.export": "lcm_exp.export.exporter",
}


def config_dir() -> str:
    return str(PACKAGE / "conf")


def sweeps_dir() -> Path:
    return (PACKAGE / "sweeps").resolve()


def current_target(path: str, warn: bool = True) -> str:
    """A `_target_` of the flat layout (`MOVED`) as today's path; any other path unchanged."""
    module, _, name = str(path).rpartition(".")
    if module not in MOVED:
        return path
    new = f"{MOVED[module]}.{name}"
    if warn:
        message = (f"_target_: {path} is deprecated (lcm_exp 0.2 moved it): write {new}. The old path works until "
                   "lcm_exp 0.3.")
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        logging.getLogger("lcm_exp").warning(message)
    return new


@functools.lru_cache(maxsize=None)
def option_yaml(group: str, option: str) -> dict:
    """The keys an option file sets, merged with the options of the same group its `defaults:` list names."""
    path = Path(config_dir()) / group / f"{option}.yaml"
    if not path.is_file():
        return {}
    node = yaml.safe_load(path.read_text()) or {}
    merged: dict = {}
    for entry in node.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_" and "/" not in entry:
            merged.update(option_yaml(group, entry))
    merged.update(node)
    return merged


def options(group: str) -> list[str]:
    """The option names of a config group (its YAML files)."""
    folder = Path(config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def groups_with_options() -> set[str]:
    """The config groups that offer a choice (more than one option file)."""
    return {p.name for p in Path(config_dir()).iterdir() if p.is_dir() and len(options(p.name)) > 1}
