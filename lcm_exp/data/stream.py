"""A resumable stream of batches over WebDataset shards: the one reader behind `data=shapes|webdataset|cached`.

Where a stream is, is one number per reader: how many raw samples it has taken from its shuffle buffer. Each
batch carries that number (`batch["data_state"]`), the trainer keeps the one of the last batch a finished step
used, and a checkpoint stores it. Everything random in a reader is a function of (data.seed, reader) and of
the sample's position, so a stream rebuilt from a checkpoint replays the same shards and the same buffer and
drops the first samples unread by the decoder (the tar is read, no image is decoded): the next batch is the one
the uninterrupted run would have drawn.

Several ranks (processes of one data-parallel run) read the same stream, and rank r keeps the samples at positions
r, r + W, r + 2W, ... of it (W ranks): it decodes only those, so the ranks' batches together are, row for row
(rank r holds rows r::W), the global batch one process would read, as long as no sample is filtered out or
unreadable (then each rank takes its next own sample: still no sample twice). The price is that every rank
reads every shard's bytes.

A "reader" is one DataLoader worker (or the main process without workers). DataLoader workers hand out batches
in turn, so after `b` batches worker `i` of a resumed stream plays reader `(i + b) % num_workers` of the old one.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import webdataset as wds
from webdataset.shardlists import expand_urls

from ..config import ConfigError

log = logging.getLogger(__name__)
NO_SAMPLE_LIMIT = 100  # unreadable samples in a row, none read yet: the shards themselves are wrong


class DataError(ConfigError):
    """Shards that cannot give a single training sample (a user's data.urls): the message says why."""


class Skips:
    """Counts skipped samples and shards in this (worker) process; each batch carries the count since the last
    one. Before the first usable sample, `NO_SAMPLE_LIMIT` failures mean the shards themselves are wrong (every
    sample lacks a caption, no shard is a tar): a DataError then names the last failure instead of warning
    forever."""

    n = 0  # since the last batch
    failed = 0  # before the first usable sample
    usable = False

    @classmethod
    def handler(cls, exn: Exception) -> bool:
        if isinstance(exn, DataError):
            raise exn
        cls.n += 1
        if not cls.usable:
            cls.failed += 1
            if cls.failed >= NO_SAMPLE_LIMIT:
                raise DataError(f"none of the first {cls.failed} samples of data.urls could be read; the last "
                                f"failure: {type(exn).__name__}: {exn}") from None
        warnings.warn(f"skipping a corrupt sample or shard: {type(exn).__name__}: {exn}", stacklevel=2)
        return True  # continue

    @classmethod
    def pop(cls) -> int:
        n, cls.n = cls.n, 0
        return n


def fingerprint(urls) -> str:
    """What identifies a stream's source: its expanded shard list (a changed list cannot resume exactly)."""
    return hashlib.sha1("\n".join(expand(urls)).encode()).hexdigest()[:12]


def expand(urls) -> list[str]:
    if isinstance(urls, (list, tuple)):
        return [u for url in urls for u in expand_urls(str(url))]
    return expand_urls(str(urls))


def usable_workers(requested: int) -> int:
    """`data.num_workers`, at most the cores this process may use (torch warns above that, and it only slows)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cores:
        log.info("data.num_workers=%d capped at %d, the cores this process may use", requested, cores)
        return cores
    return max(0, int(requested))


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of `collate([decode(sample, rng), ...])` from shards, endless and resumable (or one pass).

    decode(sample, rng) -> an item, or None for a sample to drop (a filter); it raises for a corrupt one, which
    is skipped and counted. `resampled`: shards drawn with replacement (webdataset's ResampledShards, seeded per
    reader); else epochs of a seeded shard permutation split over the ranks' readers; `epochs=1`: one pass."""

    def __init__(self, urls, decode: Callable, collate: Callable, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1000, resampled: bool = True, epochs: int | None = None,
                 num_workers: int = 0, state: dict | None = None, partial: bool = False, resolution: int | None = None):
        super().__init__()
        self.resolution = resolution  # the training images' side in pixels (validation and evaluation sample at it)
        self.urls, self.decode, self.collate = urls, decode, collate
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.shuffle_buffer, self.resampled, self.epochs = int(shuffle_buffer), bool(resampled), epochs
        self.num_workers, self.partial = int(num_workers), partial
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} of {world_size} ranks")
        self.fingerprint = fingerprint(urls)
        self.start = self._start_from(state)

    # ------------------------------------------------------------------------------------------------ resuming
    def _start_from(self, state: dict | None) -> dict:
        """{"batches": b, "readers": {reader: samples taken}} to continue from (empty: the beginning)."""
        if not state:
            return {"batches": 0, "readers": {}}
        why = None
        if state.get("fingerprint") != self.fingerprint:
            why = "data.urls lists other shards than the checkpoint's"
        elif int(state.get("num_workers", 0)) != self.num_workers:
            why = f"data.num_workers is {self.num_workers}, the checkpoint's stream had {state.get('num_workers')}"
        if why:
            log.warning("data: the stream cannot resume exactly (%s): it starts afresh from data.seed, so later "
                        "batches differ from the uninterrupted run's", why)
            return {"batches": 0, "readers": {}}
        return {"batches": int(state["batches"]), "readers": {int(k): int(v) for k, v in state["readers"].items()}}

    def state(self, batches: int, readers: dict[int, int]) -> dict:
        """The checkpointable position after `batches` batches, `readers` the samples each reader had taken."""
        return {"batches": int(batches), "readers": {str(k): int(v) for k, v in sorted(readers.items())},
                "num_workers": self.num_workers, "fingerprint": self.fingerprint}

    # ------------------------------------------------------------------------------------------------- reading
    def _reader(self) -> tuple[int, int]:
        """(this reader's index, how many readers this rank has)."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.start["batches"]) % info.num_workers, info.num_workers

    def _shard_urls(self, reader: int, readers: int) -> Iterator[dict]:
        urls = expand(self.urls)
        tag = f"{self.seed}/0/{reader}"  # (no rank: every rank reads the same stream, and keeps its own samples)
        if self.resampled:
            rng = random.Random(f"shards/{tag}")
            while True:
                yield {"url": urls[rng.randrange(len(urls))]}
        slot, slots = reader, readers
        if len(urls) < slots:
            raise DataError(f"data.urls has {len(urls)} shard(s) for {slots} readers (data.num_workers): "
                            "give more shards, lower data.num_workers, or set data.resampled=true")
        for epoch in (range(self.epochs) if self.epochs else itertools.count()):
            order = list(urls)
            if self.epochs != 1:
                random.Random(f"epoch/{self.seed}/{epoch}").shuffle(order)
            for url in order[slot::slots]:
                yield {"url": url}

    def raw_samples(self, reader: int, readers: int) -> Iterator[dict]:
        """The reader's raw samples (undecoded), in stream order."""
        stages = [lambda: self._shard_urls(reader, readers), wds.tarfile_to_samples(handler=Skips.handler)]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer),
                                      rng=random.Random(f"buffer/{self.seed}/0/{reader}")))
        return iter(wds.DataPipeline(*stages))

    def __iter__(self):
        reader, readers = self._reader()
        skip = self.start["readers"].get(reader, 0)
        t0, taken, real, items, held, last_failure = time.perf_counter(), 0, 0, [], None, None
        for sample in self.raw_samples(reader, readers):
            taken += 1
            if not sample.get("__key__"):  # the empty {} webdataset >= 0.2.96 ends each shard with
                continue
            real += 1
            if (real - 1) % self.world_size != self.rank:  # another rank's sample (read, not decoded)
                continue
            if taken <= skip:  # resuming: samples the checkpointed run had already taken, not decoded
                continue
            if skip:
                log.info("data: reader %d resumed after sample %d (%.1f s to read past them)", reader, skip,
                         time.perf_counter() - t0)
                skip = 0
            rng = random.Random(f"sample/{self.seed}/0/{reader}/{taken}")
            try:
                item = self.decode(sample, rng)
            except Exception as e:  # noqa: BLE001 - a corrupt image or field: skip it, count it
                last_failure = e
                Skips.handler(e)
                continue
            if item is None:  # filtered out (data.min_size, min_aesthetic, max_pwatermark)
                continue
            Skips.usable = True
            items.append(item)
            if len(items) == self.batch_size:
                # (one pass: each batch waits for the next, so the last one also counts what was skipped after it)
                if held is not None:
                    yield self._batch(*held)
                held, items = (items, reader, taken), []
                if not self.partial:
                    yield self._batch(*held)
                    held = None
        if items and self.partial:
            if held is not None:
                yield self._batch(*held)
            held = (items, reader, taken)
        if held is not None:
            yield self._batch(*held)
        if not Skips.usable and last_failure is not None:
            raise DataError(f"no sample of data.urls={self.urls} could be read; the last failure: "
                            f"{type(last_failure).__name__}: {last_failure}")

    def _batch(self, items: list, reader: int, taken: int) -> dict:
        batch = self.collate(items)
        batch["n_skipped"] = Skips.pop()
        batch["data_state"] = (reader, taken)
        return batch


@dataclass
class DataPosition:
    """How many batches the finished steps took, and how many raw samples each data reader had taken by then."""

    batches: int = 0
    readers: dict | None = None

    def __post_init__(self):
        self.readers = {int(k): int(v) for k, v in (self.readers or {}).items()}

    def advance(self, data_state) -> None:
        self.batches += 1
        if data_state is not None:
            reader, taken = data_state
            self.readers[int(reader)] = int(taken)

    def state(self) -> dict:
        return {"batches": self.batches, "readers": dict(self.readers)}


def batches(stream: ShardStream):
    """The stream itself (no workers), or a DataLoader whose workers run it (persistent, in-order)."""
    if stream.num_workers == 0:
        return stream
    return Workers(stream, batch_size=None, num_workers=stream.num_workers, persistent_workers=True,
                   prefetch_factor=4, worker_init_fn=_leave_stop_signals_to_the_trainer)


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
                    batch = next(it)
                except StopIteration:
                    return
                except DataError as e:
                    last = str(e).strip().splitlines()[-1]
                    raise DataError(last.split("DataError: ", 1)[-1]) from None
                yield batch
        finally:  # (closed by the trainer: the workers end now, not at interpreter exit, where multiprocessing
            # would SIGTERM them -- which they ignore -- and wait for them)
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
