"""Checkpoints that survive crashes and scale with the ranks: written atomically, checksummed by the rank that
wrote each file, checked before use by the rank that reads it.

A checkpoint is accelerate's `save_state` folder (model, optimiser, grad scaler, the EMA, every rank's RNG
states; under FSDP every rank's shards) plus each rank's data position and logging window
(`rank_state_<rank>.json`) and `trainer_state.json`, written last, which holds the step, the world size, the
lr schedule, the trajectory config (`resume.py`) and a manifest of every file with its size and CRC-32.
Everything is written into a hidden temporary folder that is renamed into place (`checkpoint-<step>`) only when
complete, so a crash or a full disk never leaves a half-written checkpoint under that name, and the previous
one is never touched before the new one is complete.

Each file belongs to one rank (`owner`: a rank's RNG states, data position and FSDP shards are its own; the
rest is rank 0's): the rank that wrote a file fsyncs and checksums it, all ranks at once, and the rank that
owns it checks it before anything loads, so neither saving nor resuming reads the whole checkpoint on every
rank, and no rank waits for one rank's serial pass over everything. Rank 0 chooses the checkpoint for all.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
_RANK_FILE = re.compile(r"(?:random_states_|rank_state_)(\d+)\.|__(\d+)_\d+\.distcp$")


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


def owner(name: str, world_size: int) -> int:
    """The rank a checkpoint file belongs to: rank r's RNG states, data position and FSDP shards are r's (r mod
    the world size when it changed), every other file rank 0's."""
    m = _RANK_FILE.search(name)
    return int(m.group(1) or m.group(2)) % world_size if m else 0


def mine(names, rank: int, world_size: int) -> list[str]:
    return [n for n in names if owner(n, world_size) == rank]


def unreadable(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """Why this rank's files of a checkpoint whose manifest holds cannot be used: a file whose contents changed
    since it was written (its checksum differs; the size may not), or None. Read before anything is loaded."""
    checksums = read_state(path).get("checksums", {})
    for name in mine(checksums, rank, world_size):
        if checksum(Path(path) / name) != checksums[name]:
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


def written(path: Path) -> float:
    try:
        return float(read_state(path).get("time", 0.0)) or path.stat().st_mtime
    except (OSError, ValueError):
        return path.stat().st_mtime


def rank_state(path: Path, rank: int) -> dict | None:
    """What rank `rank` recorded beside the weights: its data position and logging window."""
    f = Path(path) / f"rank_state_{rank}.json"
    return json.loads(f.read_text()) if f.exists() else None


def data_state(path: Path) -> dict | None:
    """The data stream's position, every rank's lanes merged (a resume on another world size deals them anew)."""
    merged = None
    for f in sorted(Path(path).glob("rank_state_*.json")):
        data = (json.loads(f.read_text()) or {}).get("data")
        if not data:
            continue
        if merged is None or "lanes" not in merged:
            merged = {**data, "lanes": dict(data.get("lanes", {}))} if "lanes" in data else data
        elif "lanes" in data:
            merged["lanes"].update(data["lanes"])
    return merged


def load(acc, candidates: list[Path], agree) -> tuple[dict, dict]:
    """Loads into accelerate's prepared objects the first of `candidates` (rank 0's choice, the same on every
    rank) whose files all check: each rank checks the files it owns, and all skip a checkpoint any rank found
    damaged (named in a warning; nothing of it is loaded). Returns (its state, with "path" and the merged "data"
    position; this rank's own state), or ({}, {}). `agree(failed)`: whether any rank failed."""
    for path in candidates:
        why = unreadable(path, acc.process_index, acc.num_processes)
        if why:
            log.warning("checkpoint %s cannot be used (%s): trying the one before", path, why)
        if agree(why is not None):
            continue
        acc.load_state(str(path))  # (every file checked above: a failure here is a bug to see, not to skip)
        state = read_state(path)
        if int(state.get("world_size", acc.num_processes)) != acc.num_processes:
            log.info("checkpoint %s was written by %s processes; this run has %d (the data lanes and the draws "
                     "are dealt anew: the same samples and numbers)", path, state.get("world_size"), acc.num_processes)
        rank = rank_state(path, acc.process_index) or {}
        state["path"], state["data"] = str(path), data_state(path)
        log.info("resumed from %s at step %d", path, int(state["step"]))
        return state, rank
    if candidates:
        log.warning("no checkpoint could be loaded; starting from step 0")
    return {}, {}


# ------------------------------------------------------------------------------------------------------- writing
def save(acc, folder: Path, step: int, rank: dict, state: dict, keep: int | None, agree) -> Path | None:
    """Writes checkpoint `step` atomically: every rank its accelerate state and `rank` (its data position and
    logging window) into the temporary folder and fsyncs and checksums the files it owns, all ranks at once;
    rank 0 gathers the manifests, writes `state` with them and renames the folder into place; the oldest beyond
    `keep` go. A failed write (a full disk, a quota) on any rank is logged and leaves the previous checkpoint as
    it was; returns the folder, or None. `agree(failed)` is True on every rank when any rank failed (every rank
    must reach the same collectives)."""
    from accelerate.utils import gather_object

    final, tmp = folder / f"{PREFIX}{step}", temporary(folder, step)
    error, manifest = None, {}
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
            manifest = seal(tmp, acc.process_index, acc.num_processes)
        except Exception as e:  # noqa: BLE001
            error = e
    failed = agree(error is not None)
    if not failed:
        manifests = gather_object([manifest]) if acc.num_processes > 1 else [manifest]
        if acc.is_main_process:
            try:
                finish(tmp, final, {**state, "time": time.time()}, {k: v for m in manifests for k, v in m.items()})
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


def seal(tmp: Path, rank: int, world_size: int) -> dict[str, tuple[int, str]]:
    """{name: (size, CRC-32)} of the files this rank owns in `tmp`, each fsynced first (on disk before the name
    says the checkpoint is whole); several files at once (zlib and fsync release the GIL)."""
    names = mine([str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()], rank, world_size)

    def one(name: str) -> tuple[int, str]:
        fd = os.open(tmp / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return (tmp / name).stat().st_size, checksum(tmp / name)

    with ThreadPoolExecutor(max(1, min(4, len(names)))) as pool:
        return dict(zip(names, pool.map(one, names)))


def temporary(folder: Path, step: int) -> Path:
    return Path(folder) / f"{TMP_PREFIX}{step}"


def finish(tmp: Path, final: Path, state: dict, manifest: dict[str, tuple[int, str]]) -> None:
    """Writes `trainer_state.json` with the manifest of `tmp`'s files ({name: (size, CRC)}, every rank's), then
    moves `tmp` to `final` (replacing an older folder of that name only once the new one is complete)."""
    body = json.dumps({**state, "files": {n: s for n, (s, _) in sorted(manifest.items())},
                       "checksums": {n: c for n, (_, c) in sorted(manifest.items())}}, indent=2, default=str)
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
