"""What a composed config must satisfy, checked right after composition, before anything is built.

Every config group is a part with a `_target_` (a function or class, ours or a user's), and each option of a
group (`conf/<group>/<option>.yaml`) is the one place that writes its keys' values. The target's signature is
the schema: a key the target does not take is an error that names the key and the nearest one it takes (Hydra
lets `+group.key=...` add any key); a parameter without a default must be set by the option (or passed at run
time, `RUNTIME`); a value must have the parameter's annotated type. Constraints on values (`skip.k >= 1`,
`guidance.w_min <= guidance.w_max`, ...) are checked by the parts themselves when they are built.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from .options import current_target, option_yaml

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# What the runner passes to each group's part at run time (the part's interface beside its config keys).
RUNTIME = {
    "teacher": set(),
    "student": {"teacher"},
    "method": set(),
    "solver": {"denoise", "z", "t", "t_prev", "schedule"},
    "loss": {"pred", "target"},
    "guidance": set(),
    "ema": {"online", "dtype"},
    "skip": {"num_train_timesteps"},  # (optional: `SkipSchedule.for_teacher` binds it)
    "data": {"batch_size", "rank", "world_size", "teacher", "state", "endless"},
    "optim": {"params"},
    "trainer": {"job_dir"},
    "tracking": {"start_dir"},
    "eval": {"device"},
    "export": set(),
}


class ConfigError(ValueError):
    """A value a user set that cannot work; the message says which key and what to do."""


def invalid(key: str, value, expected: str) -> ConfigError:
    """The message of a value that cannot work."""
    return ConfigError(f"Invalid value for {key}: {value}. Expected {expected}. Fix it with an override, e.g. "
                       f"`lcm-exp {key}=...`.")


# ------------------------------------------------------------------------------------------------ the targets
@functools.lru_cache(maxsize=None)
def target(path: str):
    """The callable a `_target_` names."""
    module, _, name = path.rpartition(".")
    try:
        obj = importlib.import_module(module)
    except ImportError:  # a nested name: module.Class.method
        parent, _, cls = module.rpartition(".")
        obj = getattr(importlib.import_module(parent), cls)
    return getattr(obj, name)


@functools.lru_cache(maxsize=None)
def parameters(path: str) -> tuple[dict[str, inspect.Parameter], bool, dict[str, Any]]:
    """(the parameters a target takes by name, whether a `**kwargs` passes other keys on, their annotations).
    A `**_` (a name starting with "_") only swallows keys: it takes none."""
    fn = target(path)
    sig = inspect.signature(fn)
    params = {n: p for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_kwargs = any(p.kind is p.VAR_KEYWORD and not p.name.startswith("_") for p in sig.parameters.values())
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # noqa: BLE001 - an annotation this process cannot resolve: no type check for it
        hints = {}
    return params, open_kwargs, hints


def _type_ok(value, hint) -> bool:
    """Whether a config value fits a parameter's annotation (int fits float; None fits Optional)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if origin is dict or hint is dict:
        return isinstance(value, (dict, DictConfig))
    return True  # anything richer (a class, a Callable): not checked here


def _takes_int(hint) -> bool:
    """Whether an annotation names int itself (int, Optional[int], int | float), not only float."""
    return hint is int or int in typing.get_args(hint)


def describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_group(group: str, node: DictConfig) -> None:
    """A group's keys against its `_target_`'s signature (see the module docstring)."""
    path = node.get("_target_")
    if not path:
        return
    try:
        params, open_kwargs, hints = parameters(str(path))
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{group}._target_={path} cannot be imported ({type(e).__name__}: {e}). Give a "
                          "module.function or module.Class that Python can import (your module on PYTHONPATH).")
    runtime = RUNTIME.get(group, set())
    replaced = _replaced_keys(group, node)
    for key in list(node):
        if key in HYDRA_KEYS:
            continue
        if key not in params and key in replaced:  # the chosen option's own key, its target replaced by a dict
            with open_dict(node):
                del node[key]
            continue
        if key not in params:
            if open_kwargs:
                continue
            takes = [n for n in params if n not in runtime]
            close = difflib.get_close_matches(key, takes, n=1)
            raise ConfigError(f"Unknown key {group}.{key}: {path} has no such setting. "
                              + (f"Did you mean {group}.{close[0]}? " if close else "")
                              + f"Its settings: {', '.join(takes) or 'none'}. See them with `lcm-exp --cfg job`.")
        if key in runtime:
            raise ConfigError(f"{group}.{key} is passed by the runner at run time; remove it from the config.")
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{group}.{key} must be set (its option leaves it open: ???), e.g. "
                              f"`lcm-exp {group}.{key}=...`.")
        value = OmegaConf.to_container(node[key], resolve=True) if OmegaConf.is_config(node[key]) else node[key]
        hint = hints.get(key, inspect.Parameter.empty)
        if not _type_ok(value, hint):
            raise invalid(f"{group}.{key}", value, f"a value of type {describe(hint)}")
        if isinstance(value, int) and not isinstance(value, bool) and _type_ok(0.5, hint) and not _takes_int(hint):
            node[key] = float(value)  # `w_max=9` is the float 9.0 the target takes (and the param a run logs)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in node and n not in runtime
               and n not in ("self", "args", "kwargs")]
    if missing:
        raise ConfigError(f"{', '.join(f'{group}.{n}' for n in missing)} must be set: {path} takes no default for "
                          f"it. Add it to the option's YAML, or set it, e.g. `lcm-exp {group}.{missing[0]}=...`.")


def _replaced_keys(group: str, node: DictConfig) -> set[str]:
    """The keys the chosen option's file set, when an override gave the group another `_target_` (a sweep over
    dicts, `loss={_target_:lcm_exp.distill.losses.l2}`, merges onto the chosen option, here huber with its huber_c)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    choice = HydraConfig.get().runtime.choices.get(group)
    chosen = option_yaml(group, choice) if choice else {}
    if chosen.get("_target_") in (None, node.get("_target_")):
        return set()
    return set(chosen) - HYDRA_KEYS


def validate(cfg: DictConfig) -> None:
    """Every group against its target (`check_group`), and what needs the machine: fp16 needs a GPU."""
    import torch

    for group in cfg:
        node = cfg[group]
        if isinstance(node, DictConfig) and "_target_" in node:
            node._target_ = current_target(str(node._target_))  # (a path of the flat layout: warned, then today's)
            check_group(str(group), node)
    trainer = cfg.get("trainer")
    if trainer is not None and trainer.get("mixed_precision") == "fp16" and (
            trainer.get("cpu") or not torch.cuda.is_available()):
        raise ConfigError("trainer.mixed_precision=fp16 needs a CUDA GPU (fp16 matmuls do not run on a CPU here). "
                          "On a CPU use trainer.mixed_precision=bf16, or no (fp32).")


def stored(cfg: DictConfig) -> DictConfig:
    """A run's stored config (`.hydra/config.yaml`) fitted to today's targets: the keys a target no longer takes
    are dropped (runs written before a part's keys changed still load for `lcm-exp-eval` and `lcm-exp-export`)."""
    import logging

    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for group in list(cfg):
        node = cfg[group]
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        node._target_ = current_target(str(node._target_), warn=False)  # (a run of the flat layout, before 0.2)
        try:
            params, open_kwargs, _ = parameters(str(node._target_))
        except (ImportError, AttributeError, ValueError):
            continue
        for key in [k for k in node if k not in HYDRA_KEYS and k not in params and not open_kwargs]:
            logging.getLogger(__name__).info("the stored %s.%s is not a setting of %s any more: ignored", group, key,
                                             node._target_)
            del node[key]
    return cfg
