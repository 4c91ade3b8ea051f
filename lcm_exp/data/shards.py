"""Reading WebDataset shards sample by sample, from any sample on: local files (seekable: a sample is found by its
byte offset), `pipe:` commands and remote URLs (webdataset's `gopen`: read from the start); and the seeded shard
sequence of each lane of `lcm_exp.data.stream`. Every byte read from a shard is counted (`ReadBytes`)."""
from __future__ import annotations

import functools
import hashlib
import random
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

from webdataset.shardlists import expand_urls


class ReadBytes:
    """Bytes this process has read from shard files and streams (`data/read_mb`, and the tests' measure)."""

    total = 0


def fingerprint(urls) -> str:
    """What identifies a stream's source: its expanded shard list (a changed list cannot resume exactly)."""
    return hashlib.sha1("\n".join(expand(urls)).encode()).hexdigest()[:12]


def expand(urls) -> list[str]:
    if isinstance(urls, (list, tuple)):
        return [u for url in urls for u in expand_urls(str(url))]
    return expand_urls(str(urls))


# ------------------------------------------------------------------------------------------------ reading a shard
class _Counting:
    """A binary stream whose reads are counted in `ReadBytes`."""

    def __init__(self, f):
        self.f = f

    def read(self, n=-1):
        data = self.f.read(n)
        ReadBytes.total += len(data)
        return data

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()


def open_shard(url: str):
    """(a counted binary stream of the shard, whether it can seek): local files directly, anything else (`pipe:`,
    http, ...) through webdataset's `gopen`."""
    path = url[len("file:"):] if url.startswith("file:") else url
    if "://" not in path and not path.startswith("pipe:"):
        return _Counting(open(path, "rb")), True
    from webdataset.gopen import gopen

    return _Counting(gopen(url, "rb")), False


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then every extension


def tar_samples(url: str, index: int = 0, byte: int | None = None) -> Iterator[tuple[int, int, int, dict]]:
    """(index, byte offset of its first header, byte offset just after it, sample) of each sample of a shard from
    sample `index` on: a sample is the tar members that share a key (`__key__`, `__url__`, one field per
    extension). A seekable shard starts at `byte` (sample `index`'s first header); another is read from its
    start, the samples before `index` read and dropped."""
    f, seekable = open_shard(url)
    try:
        start = byte if (seekable and byte) else 0
        if start:
            f.seek(start)
        n = index if start else 0
        current, first, end = None, 0, 0
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                m = _KEY.match(member.name) if member.isfile() else None
                if not m:
                    continue
                key, ext = m.group(1), m.group(2)
                if current is None or current["__key__"] != key:
                    if current is not None:
                        if n >= index:
                            yield n, first, end, current
                        n += 1
                    current, first = {"__key__": key, "__url__": url}, start + member.offset
                current[ext] = tar.extractfile(member).read()
                end = start + member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if current is not None and n >= index:
                yield n, first, end, current
    finally:
        f.close()


def read_refs(url: str, refs: list[tuple[int, int | None]]) -> dict[int, dict]:
    """The samples at (index, byte) `refs` of one shard, by index: each found by seeking on a local shard, or
    by one read of the shard up to the last of them."""
    want = sorted(set(refs))
    out = {}
    if all(b is not None for _, b in want) and _seekable(url):
        for i, b in want:
            for n, _, _, sample in tar_samples(url, i, b):
                out[n] = sample
                break
        return out
    last = max(i for i, _ in want)
    needed = {i for i, _ in want}
    for n, _, _, sample in tar_samples(url):
        if n in needed:
            out[n] = sample
        if n >= last:
            break
    return out


def _seekable(url: str) -> bool:
    path = url[len("file:"):] if url.startswith("file:") else url
    return "://" not in path and not path.startswith("pipe:")


@dataclass
class Shards:
    """The shard sequence of every lane: `url(lane, q)` is the q-th shard lane `lane` reads, a function of the seed
    and (lane, q) only. Lane l reads positions l, l + V, l + 2V, ... of the epochs' seeded shard permutations
    laid end to end (`epochs`: how many; None: endless), so no two lanes read one shard in an epoch; resampled:
    each lane draws its shards with replacement instead."""

    urls: list[str]
    seed: int
    lanes: int
    resampled: bool
    epochs: int | None

    def url(self, lane: int, q: int) -> str | None:
        if self.resampled:
            return self.urls[random.Random(f"shard/{self.seed}/{lane}/{q}").randrange(len(self.urls))]
        epoch, j = divmod(lane + self.lanes * q, len(self.urls))
        if self.epochs is not None and epoch >= self.epochs:
            return None
        return self._order(epoch)[j]

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> tuple[str, ...]:
        order = list(self.urls)
        if self.epochs != 1:  # (one pass: shard order)
            random.Random(f"epoch/{self.seed}/{epoch}").shuffle(order)
        return tuple(order)

    def __hash__(self):
        return id(self)
