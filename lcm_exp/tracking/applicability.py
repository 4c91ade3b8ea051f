"""Which config keys apply to a run, and which option of a config group a run used.

The schema (`config.py`) gives every option of a group the same keys, so `loss=l2` still carries
`loss.huber_c` and `student=full` still carries `student.lora_rank`. A key of a group applies to a run when
the option it used names it: in its own YAML file (`conf/<group>/<option>.yaml`, with the options its
`defaults:` list pulls in) or as a parameter of its `_target_`. A `**kwargs` whose name starts with `_`
(`**_`) only swallows the schema's other keys; any other `**kwargs` may pass keys on, so then every key
applies. A group without `_target_`, or one whose target cannot be imported, keeps all its keys.

Both the tracker (what it logs) and `lcm-exp-report` (what it attributes, also to runs logged before this
rule existed) ask `not_applicable()`; the tracker and the run names ask `option_name()`.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Mapping

from ..config.options import TARGET, current_target, option_yaml, options



def option_name(group: str, target: str | None, choice: str | None = None) -> str | None:
    """The option of `group` a run used: `choice` when its file has the run's `_target_`, else the option file
    with that `_target_` (a sweep that overrides `loss={_target_:lcm_exp.distill.losses.l2}` keeps Hydra's choice
    `huber`), else the target's last name (a user's own class); `choice` for groups without a target."""
    if not target:
        return choice
    target = current_target(target, warn=False)  # (a run logged before lcm_exp 0.2 moved its modules)
    if choice and option_yaml(group, choice).get(TARGET) in (target, None):  # (None: a user's own option file,
        return choice  # on their hydra.searchpath)
    for option in options(group):
        if option_yaml(group, option).get(TARGET) == target:
            return option
    return target.rsplit(".", 1)[-1]


@functools.lru_cache(maxsize=None)
def _signature_keys(target: str) -> frozenset[str] | None:
    """Parameter names of the target (a function, or a class's constructor); None when it takes any key."""
    try:
        sig = inspect.signature(_locate(target))
    except Exception:  # noqa: BLE001 - not importable here (a user's module), or no signature
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD and not p.name.startswith("_"):
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return frozenset(names)


def _locate(dotted: str):
    """`pkg.module.name` -> the object (the longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def option_keys(group: str, target: str, choice: str | None = None) -> frozenset[str] | None:
    """Top-level keys of `group` that apply with this `_target_`; None when every key may apply."""
    target = current_target(target, warn=False)
    accepted = _signature_keys(target)
    if accepted is None:
        return None
    option = option_name(group, target, choice)
    declared = set(option_yaml(group, option)) if option_yaml(group, option).get(TARGET) == target else set()
    return frozenset(accepted | declared)


def not_applicable(params: Mapping[str, object], choices: Mapping[str, str] | None = None) -> set[str]:
    """The dotted keys of flattened `params` that do not apply to the run (see the module docstring).
    `choices` (group -> option), when known, picks the option file among several with the same target."""
    choices = dict(choices or {})
    out = set()
    for key in params:
        group, _, rest = str(key).partition(".")
        if not rest or rest.startswith("_"):
            continue
        target = params.get(f"{group}.{TARGET}")
        if not target:
            continue
        keys = option_keys(group, str(target), choices.get(group) or _as_choice(params.get(group)))
        if keys is not None and rest.split(".", 1)[0] not in keys:
            out.add(key)
    return out


def _as_choice(value) -> str | None:
    return str(value) if value is not None else None
