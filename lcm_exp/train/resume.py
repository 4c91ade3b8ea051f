"""Which checkpoint a run resumes, and whether it may: the configuration a checkpoint was trained with against
this run's.

A checkpoint stores its run's *trajectory config*: the resolved config less what does not change what is
trained (`IGNORED`: where things are stored, logging, tracking, evaluation, the run's length, and the speed and
placement switches -- attention kernel, compile, channels-last, activation checkpointing, the loader workers,
the frozen networks' precision), with the paths of the teacher and the data replaced by what they name
(`named`: a folder's file names and sizes, the shards' file names), so a teacher copied to a job-local disk
is the same teacher. Two configs *differ* only in keys both have: a key a newer lcm_exp added (at its
default) or an older one removed does not count.

- `trainer.resume=latest`: the newest checkpoint of this configuration under the start folder (outputs/,
  multirun/, this job's folder). When none matches but a single run's newest checkpoint there differs, the
  run stops (exit 2) naming the keys, unless `trainer.resume_mismatch=continue`: a changed trajectory is never
  resumed, nor restarted, silently. A sweep's job resumes only its own configuration (its siblings differ by
  design).
- a path: that checkpoint (or that run folder's newest); it must match, or the same rule applies.
- a job submitit requeued: its own folder's newest checkpoint, under the same rule.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError
from .checkpoint import PREFIX, STATE_FILE, listed, problem, read_state, step_of, usable, written

log = logging.getLogger(__name__)
IGNORED = ("trainer.resume", "trainer.resume_mismatch", "trainer.max_steps", "trainer.checkpoint_every",
           "trainer.checkpoint_every_minutes", "trainer.checkpoints_total_limit", "trainer.log_every",
           "trainer.validation_every", "trainer.output_dir", "trainer.progress_bar", "trainer.cpu",
           "trainer.attention", "trainer.compile", "trainer.channels_last", "trainer.gradient_checkpointing",
           "trainer.batched_cfg", "trainer.teacher_first", "teacher.cast_to_mixed_precision",
           "teacher.cache_dir", "ema.cast_to_mixed_precision", "optim.fused", "data.num_workers", "data.cache_dir",
           "tracking", "eval", "export")
PATHS = ("teacher.pretrained", "teacher.vae", "data.urls")  # compared by what they name


def named(key: str, value) -> object:
    """What a path setting names: a local folder's files (names and sizes), shards' file names; a hub id as is."""
    if value is None:
        return None
    if key == "data.urls":
        from ..data.stream import expand

        names = [u.rstrip("/").rsplit("/", 1)[-1] for u in expand(value)]
        return f"{len(names)} shards {names[0]}..{names[-1]} ({_digest(names)})" if names else str(value)
    folder = Path(str(value)).expanduser()
    if folder.is_dir():
        files = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
        return f"a folder of {len(files)} files ({_digest(files)})"
    return str(value)


def _digest(x) -> str:
    return hashlib.sha1(json.dumps(x).encode()).hexdigest()[:10]


def trajectory_config(cfg: DictConfig) -> dict:
    """The resolved config less `IGNORED`, with `PATHS` replaced by what they name."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for dotted in IGNORED + PATHS:
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node.get(p) if isinstance(node.get(p), dict) else {}
        if leaf in node:
            value = node.pop(leaf)
            if dotted in PATHS:
                node[leaf] = named(dotted, value)
    return c


def config_key(cfg: DictConfig) -> str:
    """A hash of the trajectory config (recorded in checkpoints for scripts; matching uses `differences`)."""
    return hashlib.sha1(json.dumps(trajectory_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """`key: stored -> current` for every dotted key both configs have and that differs (IGNORED keys were never
    stored; a key only one of them has is one lcm_exp added or removed since)."""
    out = []
    for key in sorted(set(stored) & set(current)):
        x, y = stored[key], current[key]
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{key}.")
        elif x != y and not _ignored(prefix + key) and not (key == "_target_" and _same_object(x, y)):
            out.append(f"{prefix}{key}: {x} -> {y}")
    return out


def _same_object(a: str, b: str) -> bool:
    """Two `_target_` paths that name one class or function (a module moved, the old path still works)."""
    from hydra.utils import get_object

    from ..config.options import current_target

    try:
        return get_object(current_target(a, warn=False)) is get_object(current_target(b, warn=False))
    except Exception:  # (a path that no longer imports names another object)
        return False


def _ignored(dotted: str) -> bool:
    """(A checkpoint written before a key joined IGNORED still stores it.)"""
    return any(dotted == k or dotted.startswith(k + ".") for k in IGNORED)


@dataclass
class Resume:
    """What `trainer.resume` found: the checkpoints to try (best first) and how their configuration differs
    from this run's (empty: the same trajectory)."""

    candidates: list[Path] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)

    def check(self, mismatch: str, how: str) -> None:
        """Stops (a ConfigError: exit 2) on a changed trajectory, unless `trainer.resume_mismatch=continue`."""
        if not self.differs:
            return
        where = self.candidates[0] if self.candidates else "the checkpoint"
        if mismatch == "continue":
            log.warning("resuming %s although the configuration changed (trainer.resume_mismatch=continue): %s",
                        where, "; ".join(self.differs))
            return
        raise ConfigError(
            f"{how}: {where} was trained with another configuration: {'; '.join(self.differs[:8])}. To continue "
            "it with the new values add trainer.resume_mismatch=continue; to start a new run leave out "
            "trainer.resume (or give a checkpoint of this configuration).")


def find(resume: str | None, cfg: DictConfig, start_dir: Path, out_dir: Path, multirun: bool = False) -> Resume:
    """The checkpoints `trainer.resume` names (see the module docstring); `resume="job"`: a requeued job's own."""
    if not resume:
        return Resume()
    current = trajectory_config(cfg)

    def differs(path: Path) -> list[str]:
        try:
            return differences(read_state(path).get("config", {}), current)
        except (OSError, ValueError):
            return []  # (usable() names what is wrong with it)

    if resume not in ("latest", "job"):
        path = Path(resume).expanduser()
        candidates = [path] if (path / STATE_FILE).exists() or path.name.startswith(PREFIX) else (
            listed(path / "checkpoints") or listed(path))
        if not candidates or not candidates[-1].is_dir():
            raise ConfigError(f"trainer.resume={resume}: no checkpoint there. Give a checkpoint-<step> folder, a run "
                              "folder, or trainer.resume=latest.")
        good = usable(candidates)
        if not good:
            raise ConfigError(f"trainer.resume={resume}: {candidates[-1]} is incomplete or corrupt "
                              f"({problem(candidates[-1])}). Give an earlier checkpoint, or trainer.resume=latest.")
        return Resume(good, differs(good[0]))
    roots = [out_dir] if resume == "job" else [out_dir, start_dir / "outputs", start_dir / "multirun"]
    found = {p.parent for root in roots for p in Path(root).glob(f"**/checkpoints/{PREFIX}*/{STATE_FILE}")}
    # the newest first: by the time it was written (a finished run's higher step loses to today's interrupted
    # one), then by step
    newest = sorted(usable(list(found)), key=lambda p: (written(p), step_of(p)), reverse=True)
    same = [p for p in newest if not differs(p)]
    if same:
        return Resume(same)
    if resume == "job" and newest:
        return Resume(newest, differs(newest[0]))
    sweeps = (start_dir / "multirun").resolve()
    single = [] if multirun else [p for p in newest if sweeps not in p.resolve().parents]
    if single:
        return Resume(single, differs(single[0]))
    if resume == "latest":
        log.warning("trainer.resume=latest: no checkpoint of this configuration under %s; starting from step 0",
                    start_dir)
    return Resume()
