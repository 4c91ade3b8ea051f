"""A resumable, elastic stream of batches over WebDataset shards: the one reader behind `data=shapes|webdataset|cached`.

**The sample order** is a function of `data.seed`, `data.lanes` and the shards only, never of the number of ranks
or loader workers. It is made of `lanes` (V, `data.lanes`) independent lanes. Lane l reads a seeded sequence of
whole shards (drawn with replacement, or its share of seeded epoch permutations), one after the other, through
its own small shuffle buffer (`data.shuffle_buffer` samples), decodes and filters what comes out, and so yields
a sequence of kept samples. Global sample i is the (i // V)-th kept sample of lane i mod V.

**Ranks and workers read only their share.** Rank r of W takes global samples r, r + W, r + 2W, ... (the rows
r::W of every global batch), which are exactly the samples of the lanes l ≡ r (mod W): it runs those V/W lanes
and no other, and its loader workers split them again (worker j runs every nw-th of them). Every shard a lane
opens is read once, by one process, and every sample read is consumed (but for what sits in the buffers when
the run ends), so the bytes all processes read together are about the bytes the steps consume. V must be a
multiple of W; the workers of a rank are reduced to a divisor of V/W.

**Resume in bounded time.** What a lane has done is a few numbers, kept with every sample it yields: which shard
of its sequence it reads (q), the next sample's index and byte offset in that shard, how many samples its buffer
has emitted and how many it kept, and a reference (shard, index, byte offset) for each sample in its buffer. A
checkpoint stores the snapshot of each lane's last consumed sample. A resumed lane reads back its buffer's
samples (a local shard by seeking to each one, a piped or remote shard by reading it up to them) and continues
its current shard from the byte offset: a resume reads at most one buffer and the shards in flight, after an
hour as after a week. Everything random is a function of (data.seed, lane, position): the shard drawn, the
buffer's swaps, each sample's crop and flip.

**Elastic.** A checkpoint of W ranks resumes on W' ranks (V a multiple of both) exactly: each rank takes the
snapshots of its new lanes from every rank's state.

webdataset's own pipeline (`ResampledShards`, `shuffle`, `split_by_node`) has no state to checkpoint and splits
by rank and worker count, so the order would depend on the world size; wids, MosaicML Streaming and torchdata
need index files or another shard format that LAION-style shards do not have. This module reads the tar files
itself (Python's `tarfile`, webdataset's `gopen` for `pipe:` and remote URLs, webdataset's key grouping).
"""
from __future__ import annotations

import collections
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..config import ConfigError
from .shards import ReadBytes, Shards, expand, fingerprint, read_refs, tar_samples  # noqa: F401  (expand: for others)

log = logging.getLogger(__name__)
NO_SAMPLE_LIMIT = 100  # unreadable samples in a row, none read yet: the shards themselves are wrong
FILTER_LIMIT = 1000  # samples a lane's filters rejected before it kept one: the filters reject everything


class DataError(ConfigError):
    """Shards that cannot give a single training sample (a user's data.urls): the message says why."""


class Rejected(Exception):
    """Raised by a decoder for a sample its filters reject; `reason` names the filter and what the sample holds
    (e.g. "data.min_aesthetic=5: no aesthetic score in its json")."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Skips:
    """Counts skipped samples and shards in this (worker) process. Before the first usable sample,
    `NO_SAMPLE_LIMIT` failures mean the shards themselves are wrong (every sample lacks a caption, no shard is a
    tar): a DataError then names the last failure instead of warning forever."""

    failed = 0  # before the first usable sample
    usable = False

    @classmethod
    def handler(cls, exn: Exception) -> None:
        if isinstance(exn, DataError):
            raise exn
        if not cls.usable:
            cls.failed += 1
            if cls.failed >= NO_SAMPLE_LIMIT:
                raise DataError(f"none of the first {cls.failed} samples of data.urls could be read; the last "
                                f"failure: {type(exn).__name__}: {exn}") from None
        warnings.warn(f"skipping a corrupt sample or shard: {type(exn).__name__}: {exn}", stacklevel=3)


def usable_workers(requested: int) -> int:
    """`data.num_workers`, at most the cores this process may use (torch warns above that, and it only slows)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cores:
        log.info("data.num_workers=%d capped at %d, the cores this process may use", requested, cores)
        return cores
    return max(0, int(requested))


# -------------------------------------------------------------------------------------------------------- lanes
class Lane:
    """One lane: its shards in sequence, through a shuffle buffer of `buffer` samples, decoded and filtered.
    `state`: a snapshot (`snapshot()`) to continue from. `items()` yields (item, snapshot, skipped)."""

    def __init__(self, lane: int, shards: Shards, buffer: int, decode: Callable, seed: int,
                 state: dict | None = None):
        self.lane, self.shards, self.size, self.decode, self.seed = lane, shards, max(1, int(buffer)), decode, seed
        s = state or {}
        self.q, self.index, self.byte = int(s.get("q", 0)), int(s.get("index", 0)), s.get("byte", 0)
        self.emitted, self.kept = int(s.get("emitted", 0)), int(s.get("kept", 0))
        self.refs: list[list] = [list(r) for r in s.get("buffer", [])]  # [q, index, byte] per buffered sample
        self.rejected: collections.Counter = collections.Counter()
        self.read_back = 0  # samples re-read to rebuild the buffer (a resume's cost)
        self._restored: list | None = None
        self.failed_shards = 0  # (counted with the next sample's skips)

    def restore(self) -> int:
        """Reads the snapshot's buffered samples back now (else when the lane starts); returns how many."""
        self._restored = self._restore_buffer()
        return self.read_back

    def snapshot(self) -> dict:
        return {"q": self.q, "index": self.index, "byte": self.byte, "emitted": self.emitted, "kept": self.kept,
                "buffer": [list(r) for r in self.refs]}

    def _raw(self) -> Iterator[tuple[list, dict]]:
        """([q, index, byte], sample) from the current position on, shard after shard."""
        while True:
            url = self.shards.url(self.lane, self.q)
            if url is None:
                return
            try:
                for n, first, end, sample in tar_samples(url, self.index, self.byte):
                    self.index, self.byte = n + 1, end  # (a resume continues the shard after this sample)
                    yield [self.q, n, first], sample
            except Exception as e:  # noqa: BLE001 - a corrupt or missing shard: skip the rest of it
                Skips.handler(e)
                self.failed_shards += 1
            self.q, self.index, self.byte = self.q + 1, 0, 0

    def _restore_buffer(self) -> list:
        """The buffered samples of a snapshot, read back (by shard: seeking where it can)."""
        by_shard = collections.defaultdict(list)
        for q, i, b in self.refs:
            by_shard[q].append((i, b))
        samples = {}
        for q, refs in by_shard.items():
            url = self.shards.url(self.lane, q)
            try:
                got = read_refs(url, refs)
            except Exception as e:  # noqa: BLE001
                Skips.handler(e)
                got = {}
            samples.update({(q, i): s for i, s in got.items()})
        self.read_back = len(samples)
        return [(ref, samples.get((ref[0], ref[1]))) for ref in self.refs]

    def items(self):
        buf = self._restore_buffer() if self._restored is None else self._restored
        raw = self._raw()
        skipped = 0
        while True:
            # fill the buffer, then each new sample takes the place of a random one, which comes out
            out = None
            for ref, sample in raw:
                if len(buf) < self.size:
                    buf.append((ref, sample))
                    self.refs = [r for r, _ in buf]
                    continue
                k = random.Random(f"buffer/{self.seed}/{self.lane}/{self.emitted}").randrange(self.size)
                out, buf[k] = buf[k], (ref, sample)
                break
            if out is None:  # the shards ended (one pass): the buffer drains in random order
                if not buf:
                    return
                k = random.Random(f"buffer/{self.seed}/{self.lane}/{self.emitted}").randrange(len(buf))
                out = buf.pop(k)
            self.refs = [r for r, _ in buf]
            self.emitted += 1
            skipped, self.failed_shards = skipped + self.failed_shards, 0
            _, sample = out
            if sample is None:  # (a buffered sample that could not be read back)
                skipped += 1
                continue
            rng = random.Random(f"sample/{self.seed}/{self.lane}/{self.emitted - 1}")
            try:
                item = self.decode(sample, rng)
            except Rejected as r:
                self._reject(r.reason)
                continue
            except Exception as e:  # noqa: BLE001 - a corrupt image or field: skip it, count it
                Skips.handler(e)
                skipped += 1
                continue
            if item is None:
                self._reject("filtered out by the decoder")
                continue
            Skips.usable = True
            self.kept += 1
            yield item, self.snapshot(), skipped
            skipped = 0

    def _reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        if self.kept == 0 and sum(self.rejected.values()) >= FILTER_LIMIT:
            counts = "; ".join(f"{n:,} × {why}" for why, n in self.rejected.most_common(3))
            raise DataError(f"the data filters rejected every one of the first {FILTER_LIMIT:,} samples read "
                            f"({counts}). Loosen the filter or check the shards' json.")


# ------------------------------------------------------------------------------------------------- a rank's stream
def auto_lanes(lanes: int | None, shards: int, world_size: int) -> int:
    """`data.lanes`, or (null) the largest power of two up to 64 that the shards can feed, one shard per lane at a
    time (a function of the shards only: a resume on another world size finds the same). More lanes than shards
    read a shard in several lanes at once, so the same samples come close together in the order: named in a
    warning."""
    if lanes is None:
        n = 1
        while n * 2 <= min(64, shards):
            n *= 2
        return n
    if int(lanes) > shards:
        log.warning("data.lanes=%d with %d shards: several lanes read a shard at once, so samples repeat within "
                    "a few batches; give more (smaller) shards or fewer lanes", lanes, shards)
    return int(lanes)


def lane_workers(lanes_here: int, requested: int) -> int:
    """The loader workers a rank can use: the largest divisor of its lane count up to `requested` (each worker
    runs every nw-th lane, which keeps the order the lanes define)."""
    return max((n for n in range(1, max(1, requested) + 1) if lanes_here % n == 0), default=1) if requested else 0


class ShardStream(torch.utils.data.IterableDataset):
    """The kept samples of this rank's lanes, in global order: its k-th sample is global sample `consumed + rank +
    world_size * k` (`consumed`: the global samples taken before a resume). Iterating yields (item, lane, snapshot,
    skipped); `batches()` groups them into batches for the trainer.

    decode(sample, rng) -> an item; it raises `Rejected` for a sample its filters reject, anything else for a
    corrupt one (skipped and counted). `resampled`: shards drawn with replacement; else epochs of seeded shard
    permutations (`epochs=1`: one pass in shard order, one lane)."""

    def __init__(self, urls, decode: Callable, collate: Callable, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, lanes: int | None = None, shuffle_buffer: int = 16, resampled: bool = False,
                 epochs: int | None = None, num_workers: int = 0, state: dict | None = None, partial: bool = False,
                 resolution: int | None = None):
        super().__init__()
        self.resolution = resolution  # the training images' side in pixels (validation and evaluation sample at it)
        self.urls, self.decode, self.collate = urls, decode, collate
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.urls_list = expand(urls)
        if not self.urls_list:
            raise DataError(f"data.urls={urls} names no shard")
        self.lanes = 1 if epochs == 1 else auto_lanes(lanes, len(self.urls_list), world_size)  # (one pass: in order)
        self.shuffle_buffer, self.resampled, self.epochs, self.partial = int(shuffle_buffer), resampled, epochs, partial
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} of {world_size} ranks")
        if self.lanes < 1 or self.lanes % self.world_size:
            raise DataError(f"data.lanes={lanes} cannot be split over {world_size} processes: use a multiple of "
                            f"{world_size} (e.g. data.lanes={world_size * math.ceil(max(lanes, 1) / world_size)}); "
                            "the lanes define the sample order, so keep the same value for the whole run")
        self.here = self.lanes // self.world_size  # lanes l = rank + world_size * u, u < here
        self.num_workers = lane_workers(self.here, num_workers)
        if num_workers and self.num_workers != num_workers:
            log.info("data.num_workers=%d: %d loader workers split this rank's %d lanes evenly", num_workers,
                     self.num_workers, self.here)
        self.fingerprint = fingerprint(urls)
        self.consumed, self.snapshots = self._start_from(state)

    # ------------------------------------------------------------------------------------------------ resuming
    def _start_from(self, state: dict | None) -> tuple[int, dict[int, dict]]:
        """(global samples consumed, {lane: snapshot}) to continue from (0, {}: the beginning)."""
        if not state:
            return 0, {}
        why = None
        if "lanes" not in state:
            why = "the checkpoint was written before lanes (lcm_exp < 0.2)"
        elif state.get("fingerprint") != self.fingerprint:
            why = "data.urls lists other shards than the checkpoint's"
        elif int(state.get("lane_count", -1)) != self.lanes:
            why = f"data.lanes is {self.lanes}, the checkpoint's stream had {state.get('lane_count')}"
        if why:
            log.warning("data: the stream cannot resume exactly (%s): it starts afresh from data.seed, so later "
                        "batches differ from the uninterrupted run's", why)
            return 0, {}
        return int(state["consumed"]), {int(k): v for k, v in state["lanes"].items()}

    def state(self, consumed: int, snapshots: dict) -> dict:
        """The checkpointable position: `consumed` global samples taken, `snapshots` this rank's lanes' last
        consumed snapshots (the checkpoint merges every rank's)."""
        mine = {k: v for k, v in snapshots.items() if int(k) % self.world_size == self.rank}
        return {"consumed": int(consumed), "lanes": {str(k): v for k, v in sorted(mine.items())},
                "lane_count": self.lanes, "fingerprint": self.fingerprint}

    # ------------------------------------------------------------------------------------------------- reading
    def _order(self, worker: int, workers: int) -> list[int]:
        """This reader's lanes in the order it serves them: the rank's k-th sample comes from local lane
        (consumed / W + k) mod here, and worker j serves k = j, j + nw, ..."""
        base = self.consumed // self.world_size
        return [self.rank + self.world_size * ((base + k) % self.here)
                for k in range(worker, worker + self.here, workers)][: self.here // workers]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = Shards(self.urls_list, self.seed, self.lanes, self.resampled, self.epochs)
        order = self._order(worker, workers)
        lanes = {l: Lane(l, shards, self.shuffle_buffer, self.decode, self.seed, self.snapshots.get(l)) for l in order}
        if self.snapshots:
            t0, before = time.perf_counter(), ReadBytes.total
            n = sum(lane.restore() for lane in lanes.values())
            log.info("data: %d lanes resumed: %d buffered samples read back (%.1f MB, %.2f s)", len(lanes), n,
                     (ReadBytes.total - before) / 2 ** 20, time.perf_counter() - t0)
        streams = {l: lane.items() for l, lane in lanes.items()}
        while streams:
            for l in order:
                if l not in streams:
                    continue
                try:
                    item, snapshot, skipped = next(streams[l])
                except StopIteration:  # (one pass: this lane's shards are done)
                    del streams[l]
                    continue
                yield item, l, snapshot, skipped, (os.getpid(), ReadBytes.total)
            if self.epochs is None and len(streams) < len(order):
                return  # (an endless stream's lane ran dry: the order cannot go on)


@dataclass
class DataPosition:
    """Where the finished optimiser steps left the stream: the global samples they took (`consumed`) and this
    rank's lanes' snapshots at their last consumed samples (`lanes`)."""

    consumed: int = 0
    lanes: dict | None = None

    def __post_init__(self):
        self.lanes = {int(k): v for k, v in (self.lanes or {}).items()}

    @classmethod
    def of(cls, state: dict | None, steps: int, samples_per_step: int) -> "DataPosition":
        """The position a checkpoint's data state gives (one of lcm_exp < 0.2 has no lanes: from its step)."""
        if state and "lanes" in state:
            return cls(int(state["consumed"]), state["lanes"])
        return cls(steps * samples_per_step)

    def advance(self, batches: list[dict], samples: int) -> None:
        """After an optimiser step on `batches`, which took `samples` global samples."""
        self.consumed += samples
        for batch in batches:
            self.lanes.update(batch.get("data_state") or {})


class Batches:
    """The batches of a `ShardStream` for the trainer: items grouped `batch_size` at a time and collated, read in
    this process or by loader workers (persistent, in order: item n from worker n mod nw). Each batch carries
    "n_skipped", "read_mb" (the MB of shards this rank's processes have read so far) and "data_state" ({lane:
    snapshot} of its items)."""

    def __init__(self, stream: ShardStream):
        self.dataset = stream

    def __iter__(self):
        stream, size = self.dataset, self.dataset.batch_size
        items = iter(stream) if stream.num_workers == 0 else iter(Workers(
            stream, batch_size=None, num_workers=stream.num_workers, persistent_workers=True, prefetch_factor=4 * size,
            worker_init_fn=_leave_stop_signals_to_the_trainer))
        group, skipped, lanes, read = [], 0, {}, {}
        try:
            for item, lane, snapshot, n_skipped, (pid, total) in items:
                group.append(item)
                skipped += n_skipped
                lanes[lane], read[pid] = snapshot, total
                if len(group) == size:
                    yield self._batch(group, skipped, lanes, read)
                    group, skipped, lanes = [], 0, {}
            if group and stream.partial:
                yield self._batch(group, skipped, lanes, read)
        finally:  # (closed: the loader workers end now, not at interpreter exit)
            if hasattr(items, "close"):
                items.close()

    def _batch(self, group, skipped, lanes, read) -> dict:
        batch = self.dataset.collate(group)
        batch["n_skipped"], batch["data_state"] = skipped, lanes
        batch["read_mb"] = sum(read.values()) / 2 ** 20  # (every process of this rank, since it started)
        return batch


def batches(stream: ShardStream) -> Batches:
    return Batches(stream)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A preemption signal sent to the whole process group (SLURM, `scancel`, `kill -- -PGID`) must not kill the
    loader workers under the training step: the trainer checkpoints and stops, then closes the loader, which ends
    the workers (torch's sentinel; and its watchdog ends them if the trainer's process dies)."""
    import signal

    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class Workers(torch.utils.data.DataLoader):
    """A DataLoader that passes a worker's DataError on as the one-line message it was (torch wraps it in the
    worker's traceback text), and whose workers end when its iterator is closed."""

    def __iter__(self):
        it = super().__iter__()
        try:
            while True:
                try:
                    item = next(it)
                except StopIteration:
                    return
                except DataError as e:
                    last = str(e).strip().splitlines()[-1]
                    raise DataError(last.split("DataError: ", 1)[-1]) from None
                yield item
        finally:  # (closed by the trainer: the workers end now, not at interpreter exit, where multiprocessing
            # would SIGTERM them -- which they ignore -- and wait for them)
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()  # (asks them to stop; one blocked in a read, e.g. of a stalled pipe, cannot hear it)
            for worker in getattr(it, "_workers", []):
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)
