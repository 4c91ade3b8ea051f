"""Parts built from their YAML option (`conf/<group>/<option>.yaml`), as the runner builds them, for tests that
call a part directly: `part("eval", steps=[1, 2])(device="cpu")`, `part("student", "lora", lora_rank=4,
runtime={"teacher": t})`."""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lcm_exp.config import config_dir


def option(group: str, name: str = "default"):
    """The option's config node (with the options its `defaults:` list pulls in)."""
    node = OmegaConf.load(Path(config_dir()) / group / f"{name}.yaml")
    merged = OmegaConf.create()
    for parent in node.pop("defaults", []) or []:
        if isinstance(parent, str) and parent != "_self_":
            merged = OmegaConf.merge(merged, option(group, parent))
    return OmegaConf.merge(merged, node)


def part(group: str, name: str = "default", runtime: dict | None = None, **overrides):
    """`instantiate` of the option with `overrides` of its keys and the run-time arguments `runtime` (a
    `_partial_` option gives a partial)."""
    node = option(group, name)
    for key, value in overrides.items():
        node[key] = value
    return instantiate(node, **(runtime or {}))
