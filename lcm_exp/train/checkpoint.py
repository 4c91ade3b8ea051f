"""Checkpoints that survive crashes: written atomically, checked before use, found again by configuration.

A checkpoint is accelerate's `save_state` folder (model, optimiser, lr schedule, grad scaler, the EMA, every
rank's RNG states) plus each rank's data position and logging window (`rank_state_<rank>.json`) and `trainer_state.json`, written
last, which holds the step, the configuration's key and resolved config, the logging window and a manifest of
every file with its size and checksum. Everything is written into a hidden temporary folder that is renamed into place
(`checkpoint-<step>`) only when complete, so a crash or a full disk never leaves a half-written checkpoint under
that name, and the previous one is never touched before the new one is complete. A checkpoint whose files no
longer match its manifest (truncated, deleted) is named in a warning and skipped for the one before it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
# Keys that do not change what is trained, or that a user may change between a run and its resume (more shards,
# other loader workers: the stream then says it cannot continue exactly): a checkpoint of the same config with
# other values of these resumes.
RESUME_IGNORES = ("data.urls", "data.num_workers", "trainer.resume", "trainer.max_steps", "trainer.checkpoint_every", "trainer.checkpoint_every_minutes",
                  "trainer.checkpoints_total_limit", "trainer.log_every", "trainer.validation_every",
                  "trainer.output_dir", "trainer.progress_bar", "tracking", "eval", "export")


# ------------------------------------------------------------------------------------------------- configuration
def trajectory_config(cfg: DictConfig) -> dict:
    """The resolved config less the keys that do not change the training trajectory (RESUME_IGNORES)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for dotted in RESUME_IGNORES:
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return c


def config_key(cfg: DictConfig) -> str:
    """A hash of what determines the training trajectory, to match checkpoints for `trainer.resume=latest`."""
    return hashlib.sha1(json.dumps(trajectory_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (`key: a -> b`)."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, "<unset>"), b.get(key, "<unset>")
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x} -> {y}")
    return out


# ------------------------------------------------------------------------------------------------------- reading
def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def listed(folder: Path) -> list[Path]:
    """The complete-named checkpoints in `folder` (never the temporary ones), oldest first."""
    found = [p for p in Path(folder).glob(PREFIX + "*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be used (missing state file, a file missing or of another size than
    its manifest says), or None when it is whole."""
    try:
        state = read_state(path)
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} unreadable ({e})"
    for name, size in state.get("files", {}).items():
        f = Path(path) / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def checksum(path: Path) -> str:
    """CRC-32 of a file's bytes (several GB/s: it catches damaged contents, it is not a security hash)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def unreadable(path: Path) -> str | None:
    """Why a checkpoint whose manifest holds cannot be used: a file whose contents changed since it was written
    (its checksum differs; the size may not), or None. Read in full, before anything is loaded into the models."""
    for name, crc in read_state(path).get("checksums", {}).items():
        if checksum(Path(path) / name) != crc:
            return f"{name} is damaged (its checksum differs from the one written with it)"
    return None


def usable(candidates: list[Path]) -> list[Path]:
    """The candidates (highest step first) less those that are not whole (each named in a warning)."""
    out = []
    for path in sorted(candidates, key=step_of, reverse=True):
        why = problem(path)
        if why:
            log.warning("checkpoint %s is incomplete or corrupt (%s): skipping it for the one before", path, why)
        else:
            out.append(path)
    return out


def find(resume: str | None, cfg: DictConfig, start_dir: Path, out_dir: Path) -> list[Path]:
    """The checkpoints to try, best first. `latest`: this configuration's checkpoints among this start folder's
    runs (outputs/, multirun/ and this job's folder); a path: that checkpoint (or that run folder's), which must
    be of this configuration."""
    if not resume:
        return []
    key = config_key(cfg)
    if resume not in ("latest", "job"):
        path = Path(resume).expanduser()
        if (path / STATE_FILE).exists() or path.name.startswith(PREFIX):
            candidates = [path]
        else:
            candidates = listed(path / "checkpoints") or listed(path)
        if not candidates or not candidates[-1].is_dir():
            raise ConfigError(f"trainer.resume={resume}: no checkpoint there. Give a checkpoint-<step> folder, a run "
                              "folder, or trainer.resume=latest.")
        try:
            state = read_state(candidates[-1])
        except (OSError, ValueError):
            state = {}
        if state.get("config_key") not in (None, key):
            diff = differences(state.get("config", {}), trajectory_config(cfg))
            raise ConfigError(f"trainer.resume={resume} is a checkpoint of another configuration; it differs in "
                              f"{'; '.join(diff[:8]) or 'keys this version cannot list'}. Resume it with the same "
                              "overrides as the run that wrote it, or use trainer.resume=latest to find this "
                              "configuration's own checkpoints.")
        good = usable(candidates)
        if not good:
            raise ConfigError(f"trainer.resume={resume}: {candidates[-1]} is incomplete or corrupt "
                              f"({problem(candidates[-1])}). Give an earlier checkpoint, or trainer.resume=latest.")
        return good
    found = set()
    # "job" (a job submitit requeued: it runs again in its own output folder): only that folder's checkpoints
    roots = {out_dir} if resume == "job" else {out_dir, start_dir / "outputs", start_dir / "multirun"}
    for root in roots:
        for state_file in Path(root).glob(f"**/checkpoints/{PREFIX}*/{STATE_FILE}"):
            try:
                if json.loads(state_file.read_text()).get("config_key") == key:
                    found.add(state_file.parent)
            except (OSError, ValueError):
                found.add(state_file.parent)  # (usable() names it)
    # the newest first: by the time it was written (a finished run's higher step loses to today's interrupted
    # one), then by step
    good = sorted(usable(list(found)), key=lambda p: (written(p), step_of(p)), reverse=True)
    if not good and resume == "latest":
        log.warning("trainer.resume=latest: no checkpoint of this configuration under %s; starting from step 0",
                    start_dir)
    return good


def written(path: Path) -> float:
    try:
        return float(read_state(path).get("time", 0.0)) or path.stat().st_mtime
    except (OSError, ValueError):
        return path.stat().st_mtime


def rank_state(path: Path, rank: int) -> dict | None:
    """What rank `rank` recorded beside the weights: its data position and logging window."""
    f = Path(path) / f"rank_state_{rank}.json"
    return json.loads(f.read_text()) if f.exists() else None


def load(acc, candidates: list[Path]) -> tuple[dict, dict]:
    """Loads into accelerate's prepared objects the first of `candidates` whose every file reads (each one that
    does not is named in a warning and nothing of it is loaded): (its state, with "path" and this rank's "data"
    position; this rank's own state), or ({}, {}) when none could be loaded."""
    for path in candidates:
        why = unreadable(path)
        if why:
            log.warning("checkpoint %s cannot be used (%s): trying the one before", path, why)
            continue
        acc.load_state(str(path))  # (every file read above: a failure here is a bug to see, not to skip)
        state = read_state(path)
        if int(state.get("world_size", acc.num_processes)) != acc.num_processes:
            log.warning("checkpoint %s was written by %s processes, this run has %d: it cannot resume exactly "
                        "(the data streams and draws are split differently)", path, state.get("world_size"),
                        acc.num_processes)
        rank = rank_state(path, acc.process_index) or {}
        state["path"], state["data"] = str(path), rank.get("data")
        log.info("resumed from %s at step %d", path, int(state["step"]))
        return state, rank
    if candidates:
        log.warning("no checkpoint could be loaded; starting from step 0")
    return {}, {}


# ------------------------------------------------------------------------------------------------------- writing
def save(acc, folder: Path, step: int, rank: dict, state: dict, keep: int | None, agree) -> Path | None:
    """Writes checkpoint `step` atomically: every rank its accelerate state and `rank` (its data position and
    logging window) into the temporary folder, then rank 0 the manifest and `state`, and renames it into place;
    the oldest beyond `keep` go. A failed write (a full disk, a quota) on any rank is logged and leaves the
    previous checkpoint as it was; returns the folder, or None. `agree(failed)` is True on every rank when any
    rank failed (every rank must reach the same collectives)."""
    final, tmp = folder / f"{PREFIX}{step}", temporary(folder, step)
    error = None
    try:
        if acc.is_main_process:
            clear_temporary(folder)
            tmp.mkdir(parents=True)
    except Exception as e:  # noqa: BLE001
        error = e
    if not agree(error is not None):
        try:
            acc.save_state(str(tmp))
            (tmp / f"rank_state_{acc.process_index}.json").write_text(json.dumps(rank))
        except Exception as e:  # noqa: BLE001
            error = e
    failed = agree(error is not None)
    if acc.is_main_process and not failed:
        try:
            finish(tmp, final, {**state, "time": time.time()})
        except Exception as e:  # noqa: BLE001
            error = e
    failed = agree(failed or error is not None)  # (every rank learns whether rank 0's part worked)
    if acc.is_main_process:
        if failed:
            clear_temporary(folder)
            previous = listed(folder)
            log.error("checkpoint at step %d could not be written (%s: %s); %s. Training goes on.", step,
                      type(error).__name__ if error else "another rank", error or "failed",
                      f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint")
        else:
            prune(folder, keep)
            log.info("saved checkpoint %s", final)
    acc.wait_for_everyone()
    return None if failed else final


def temporary(folder: Path, step: int) -> Path:
    return Path(folder) / f"{TMP_PREFIX}{step}"


def finish(tmp: Path, final: Path, state: dict) -> None:
    """Writes `trainer_state.json` with the manifest of `tmp`'s files, then moves `tmp` to `final` (replacing an
    older folder of that name only once the new one is complete)."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    for name in files:  # on disk before the name says the checkpoint is whole
        fd = os.open(tmp / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    checksums = {name: checksum(tmp / name) for name in files}
    body = json.dumps({**state, "files": files, "checksums": checksums}, indent=2, default=str)
    with open(tmp / STATE_FILE, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # (the same step saved again): the old one leaves only once the new one is in place
        old = final.with_name(TMP_PREFIX + final.name[len(PREFIX):] + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clear_temporary(folder: Path) -> None:
    """Removes what a save interrupted by a crash left behind; a temporary folder that was complete (its
    `trainer_state.json` written, the crash between the two renames of `finish`) takes its place instead."""
    for p in sorted(Path(folder).glob(TMP_PREFIX + "*")):
        final = Path(folder) / (PREFIX + p.name[len(TMP_PREFIX):])
        if final.name[len(PREFIX):].isdigit() and not final.exists() and problem(p) is None:
            os.replace(p, final)
            log.warning("checkpoint %s was complete but not in place (a crash mid-rename): restored", final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def prune(folder: Path, keep: int | None) -> None:
    if not keep:
        return
    ckpts = listed(folder)
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
