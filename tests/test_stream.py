"""The data stream at scale (issue 26), on real shards of ~100 KB samples: the sample order does not depend on the
ranks or loader workers; each rank and worker reads only its share of the shards, so all processes together
read about what the steps consume; a resume reads a bounded amount (one buffer and the shards in flight)
whatever the number of samples taken before, and continues exactly, on the same or another world size, from
local and piped shards; filters that reject everything stop with a message."""
from __future__ import annotations

import os

import pytest
import webdataset as wds

from lcm_exp.data.stream import Batches, DataError, ReadBytes, Rejected, ShardStream

SAMPLE_BYTES = 100_000
SHARDS, PER_SHARD = 16, 40


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    """16 shards of 40 samples of ~100 KB (a key, a caption and 100 KB of bytes: LAION-sized, cheap to decode)."""
    d = tmp_path_factory.mktemp("shards")
    for s in range(SHARDS):
        with wds.TarWriter(str(d / f"s-{s:05d}.tar")) as w:
            for i in range(PER_SHARD):
                w.write({"__key__": f"{s:02d}-{i:03d}", "txt": f"sample {s}-{i}", "bin": os.urandom(SAMPLE_BYTES)})
    return str(d / f"s-{{00000..{SHARDS - 1:05d}}}.tar")


def key(sample, rng):
    return sample["__key__"]


def stream(urls, rank=0, world_size=1, batch_size=4, state=None, workers=0, lanes=8, buffer=4, **kw):
    return ShardStream(urls, decode=key, collate=lambda items: {"keys": items, "captions": items},
                       batch_size=batch_size, seed=3, rank=rank, world_size=world_size, lanes=lanes,
                       shuffle_buffer=buffer, num_workers=workers, state=state, **kw)


def take(s: ShardStream, n: int) -> list[dict]:
    batches = Batches(s)
    it = iter(batches)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()  # (the generator: its loader workers end now)


def keys(batches) -> list[list[str]]:
    return [b["keys"] for b in batches]


def rows(world_size: int, per_rank: list[list[list[str]]]) -> list[list[str]]:
    """The global batches the ranks' batches make (rank r holds rows r::W)."""
    out = []
    for parts in zip(*per_rank):
        batch = [None] * sum(map(len, parts))
        for r, part in enumerate(parts):
            batch[r::world_size] = part
        out.append(batch)
    return out


def position(batches, consumed) -> dict:
    lanes = {}
    for b in batches:
        lanes.update(b["data_state"])
    return consumed, lanes


def test_the_order_does_not_depend_on_ranks_or_workers(urls):
    one = keys(take(stream(urls, batch_size=8), 12))
    assert len({k for b in one for k in b}) == 96  # (no sample twice in 12 batches)
    for world_size in (2, 4):
        parts = [keys(take(stream(urls, r, world_size, 8 // world_size), 12)) for r in range(world_size)]
        assert rows(world_size, parts) == one
    parts = [keys(take(stream(urls, r, 2, 4, workers=2), 12)) for r in range(2)]  # 2 ranks x 2 loader workers
    assert rows(2, parts) == one


def bytes_read(urls, world_size, workers, batches=25, batch_size=8) -> int:
    """The shard bytes every process of `world_size` ranks (each with `workers` loader workers) reads for
    `batches` global batches: the batches' own count, which loader workers report too."""
    total = 0
    for r in range(world_size):
        ReadBytes.total = 0
        out = take(stream(urls, r, world_size, batch_size // world_size, workers=workers, lanes=16), batches)
        total += out[-1]["read_mb"] * 2 ** 20
    return total


def test_ranks_and_workers_read_only_their_share(urls):
    consumed = 25 * 8 * SAMPLE_BYTES
    one = bytes_read(urls, 1, 0)
    assert consumed <= one <= 1.6 * consumed  # (the lanes' buffers are read ahead: 16 lanes x 4 samples)
    for world_size, workers in ((2, 0), (2, 2)):
        assert bytes_read(urls, world_size, workers) <= 1.25 * one, (world_size, workers)


def test_rchar_agrees_with_the_count(urls):
    """An independent measure of the same reads: the kernel's count of bytes this process read (/proc)."""
    def rchar():
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar:")).split()[1])

    if not os.path.exists("/proc/self/io"):
        pytest.skip("no /proc/self/io")
    ReadBytes.total, before = 0, rchar()
    out = take(stream(urls, batch_size=8, lanes=16), 25)
    kernel = rchar() - before
    assert 0.95 * out[-1]["read_mb"] * 2 ** 20 <= kernel <= 1.1 * out[-1]["read_mb"] * 2 ** 20 + 2 ** 20


@pytest.mark.parametrize("pipe", [False, True], ids=["local", "pipe"])
def test_a_resume_reads_a_bounded_amount_and_continues_exactly(urls, pipe):
    """After 5 or 50 batches (40 or 400 samples: 10x), the resumed stream reads about the same (its buffers and
    the shards in flight, seeking in local shards) and gives the uninterrupted stream's next batches."""
    if pipe:
        from lcm_exp.data.shards import expand

        urls = [f"pipe:cat {u}" for u in expand(urls)]
    uninterrupted = keys(take(stream(urls, batch_size=8), 55))
    cost = {}
    for n in (5, 50):
        state = stream(urls, batch_size=8).state(*position(take(stream(urls, batch_size=8), n), 8 * n))
        ReadBytes.total = 0
        resumed = take(stream(urls, batch_size=8, state=state), 5)
        assert keys(resumed) == uninterrupted[n:n + 5]
        cost[n] = ReadBytes.total
    shard = PER_SHARD * SAMPLE_BYTES
    assert cost[50] <= 1.5 * cost[5] + 2 * shard, cost  # not 10x
    if not pipe:  # seeking: the 8 lanes' buffers (4 samples each) and the 5 batches ahead, not whole shards
        assert cost[50] <= (8 * 4 + 5 * 8 + 8 * 4) * 1.2 * SAMPLE_BYTES, cost


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4)])
def test_a_resume_on_another_world_size_continues_exactly(urls, before, after):
    uninterrupted = keys(take(stream(urls, batch_size=8), 10))
    states = []
    for r in range(before):  # each rank checkpoints its own lanes; the checkpoint merges them
        s = stream(urls, r, before, 8 // before)
        states.append(s.state(*position(take(s, 6), 6 * 8)))
    merged = {**states[0], "lanes": {k: v for st in states for k, v in st["lanes"].items()}}
    parts = [keys(take(stream(urls, r, after, 8 // after, state=merged), 4)) for r in range(after)]
    assert rows(after, parts) == uninterrupted[6:10]


def test_lanes_must_split_over_the_ranks(urls):
    with pytest.raises(DataError, match="data.lanes=8 cannot be split over 3 processes: use a multiple of 3"):
        stream(urls, 0, 3, 2)


def test_filters_that_reject_everything_stop_with_their_reason(urls):
    def reject(sample, rng):
        raise Rejected("data.min_aesthetic=5.0: no aesthetic score in its json (fields: width)")

    s = ShardStream(urls, decode=reject, collate=list, batch_size=2, lanes=4)
    with pytest.raises(DataError, match=r"rejected every one of the first 1,000 samples read \(1,000 × "
                                        r"data.min_aesthetic=5.0: no aesthetic score"):
        take(s, 1)
