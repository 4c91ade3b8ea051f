"""The configuration layer, below everything else: what a composed config must satisfy (`schema`: each group's
keys checked against its `_target_`'s signature, `ConfigError` for a value a user set that cannot work) and
where the YAML lives (`options`: `conf/`, `sweeps/`, an option file's keys, the deprecated paths of moved
targets). It imports nothing else of lcm_exp."""
from .options import config_dir, sweeps_dir
from .schema import ConfigError, invalid, stored, validate

__all__ = ["ConfigError", "config_dir", "invalid", "stored", "sweeps_dir", "validate"]
