"""What a run is called and which option of each config group it used, from Hydra's record of the job.

- `group_choices()`: `{"loss": "huber", "solver": "ddim", "teacher": "tiny", ...}` from Hydra's
  `runtime.choices`, corrected where a sweep replaced a group by a dict (`loss={_target_:...l2}` leaves
  Hydra's choice at the default): the option is then the one whose file has the run's `_target_`.
- `run_name()`: the overrides that make this run what it is, short: `loss=huber skip.k=10`, the experiment
  preset first (`smoke trainer.max_steps=3`), `default` for none. A sweep's job is named by its own
  overrides: the sweep callback puts the overrides every job shares in `LCM_EXP_SWEEP_FIXED`, and they are
  left out. Keys that do not change what is trained (where things are stored, tracking) are left out too.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

from .applicability import TARGET, option_name

SWEEP_FIXED_ENV = "LCM_EXP_SWEEP_FIXED"  # JSON list of the overrides all jobs of a sweep share
MAX_NAME = 250  # MLflow's limit on a run name
MAX_VALUE = 40
IGNORED = ("hydra", "tracking", "sweep", "export", "teacher.cache_dir", "data.cache_dir", "trainer.output_dir",
           "trainer.resume", "trainer.log_every", "trainer.checkpoint_every", "trainer.checkpoints_total_limit")
SKIPPED_GROUPS = ("hydra", "lcm_exp_schema")


def _hydra():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def group_choices(params: Mapping[str, object] | None = None) -> dict[str, str]:
    """Group -> option of this job (no `hydra/...` groups, no unset ones). Without Hydra (a library use),
    each group with a `_target_` in the flattened `params` is named from it."""
    params = params or {}
    hc = _hydra()
    choices = {} if hc is None else {g: str(o) for g, o in hc.runtime.choices.items()
                                     if o is not None and not g.startswith(SKIPPED_GROUPS)}
    targets = {k[: -len(TARGET) - 1]: str(v) for k, v in params.items() if k.endswith("." + TARGET) and "." not in
               k[: -len(TARGET) - 1]}
    for group, target in targets.items():
        name = option_name(group, target, choices.get(group))
        if name:
            choices[group] = name
    return choices


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in IGNORED)


def _fmt(value) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(_fmt(v) for v in value) + "]"
    elif isinstance(value, str) and value.startswith(("/", "~", "./", "../")) or "://" in str(value):
        text = str(value).rstrip("/").rsplit("/", 1)[-1]  # a path or URL: its last part
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def describe(override) -> list[str]:
    """One parsed Hydra override -> its parts of a run name (a group replaced by a dict: its option and keys)."""
    key, value = override.key_or_group, override.value()
    if override.is_delete() or _ignored(key):
        return []
    if key == "experiment":
        return [str(value)]
    if isinstance(value, dict):
        parts = [f"{key}={option_name(key, str(value[TARGET]))}"] if TARGET in value else []
        return parts + [f"{key}.{k}={_fmt(v)}" for k, v in value.items() if not str(k).startswith("_")]
    return [f"{key}={_fmt(value)}"]


def name_from_overrides(overrides: Iterable[str], fixed: Iterable[str] = ()) -> str:
    """`["experiment=smoke", "loss=l2", "skip.k=10"]` -> `smoke loss=l2 skip.k=10`; `fixed` ones left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        shared = {_identity(o) for o in parser.parse_overrides(list(fixed))}
        parsed = [o for o in parser.parse_overrides(list(overrides)) if _identity(o) not in shared]
    except Exception:  # noqa: BLE001 - an override Hydra accepted but we cannot re-read: show it as given
        return _cut(" ".join(o for o in overrides if o not in set(fixed))) or "default"
    parts = [p for o in parsed for p in describe(o)]
    presets = [p for p in parts if "=" not in p]
    return _cut(" ".join(presets + [p for p in parts if "=" in p])) or "default"


def _identity(override) -> str:
    """Key and value, whatever their spelling (a multirun job gets `x=True` for the command line's `x=true`)."""
    return override.get_key_element() + "=" + json.dumps(override.value(), sort_keys=True, default=str)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_NAME else text[: MAX_NAME - 1] + "…"


def sweep_fixed() -> list[str]:
    try:
        return list(json.loads(os.environ.get(SWEEP_FIXED_ENV, "[]")))
    except ValueError:
        return []


def run_name() -> str:
    """This job's name (see the module docstring); `default` outside Hydra or with no overrides."""
    hc = _hydra()
    if hc is None:
        return "default"
    multirun = str(getattr(hc.mode, "name", hc.mode)).endswith("MULTIRUN")
    return name_from_overrides(list(hc.overrides.task), sweep_fixed() if multirun else ())


def fixed_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides of a multirun command line that are not sweeps (shared by every job)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [line for line, o in zip(overrides, parsed) if not o.is_sweep_override()]

