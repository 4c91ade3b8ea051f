"""The data builders of `conf/data/shapes.yaml` and `webdataset.yaml`, and what the evaluation takes from a
dataset (`EvalSource`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import wds


@dataclass
class EvalSource:
    """What the evaluation takes from the dataset: `prompts(n, seed)` (held-out prompts, or None: the dataset's
    first captions), whether the shapes `adherence` checker applies, and `batches(batch_size)`, batches with
    "captions" (and "pixels" where the dataset has images, for fid/kid)."""

    prompts: Callable[[int, int], list[str]] | None
    adherence: bool
    batches: Callable[[int], object]


def stream_of(data):
    """The `ShardStream` behind a builder's batches (a DataLoader's dataset, or the stream itself)."""
    return getattr(data, "dataset", data)


def shapes_source(num_samples: int, resolution: int, seed: int, cache_dir: str) -> EvalSource:
    """data=shapes (and data=cached computed from it): held-out captions, the checker, the training images."""
    from .shapes import eval_prompts

    def batches(batch_size: int):
        return shapes_loader(batch_size, num_samples, resolution, seed, shuffle_buffer=0, resampled=False, lanes=1,
                             num_workers=0, cache_dir=cache_dir, endless=False)
    return EvalSource(eval_prompts, True, batches)


def webdataset_loader(batch_size: int, urls: str | None, resolution: int, seed: int, lanes: int | None, shuffle_buffer: int,
                      resampled: bool, center_crop: bool, random_flip: bool, num_workers: int, min_size: int,
                      min_aesthetic: float | None, max_pwatermark: float | None, rank: int = 0, world_size: int = 1,
                      teacher=None, state: dict | None = None, endless: bool = True):
    """`data=webdataset`: real LAION-style shards (img2dataset layout) from `data.urls`."""
    kw = dict(resolution=resolution, seed=seed, center_crop=center_crop, random_flip=random_flip, min_size=min_size,
              min_aesthetic=min_aesthetic, max_pwatermark=max_pwatermark)
    data = wds.loader(urls, batch_size=batch_size, lanes=lanes, shuffle_buffer=shuffle_buffer, resampled=resampled,
                      num_workers=num_workers, rank=rank, world_size=world_size, state=state, endless=endless, **kw)
    stream_of(data).eval_source = EvalSource(None, False, lambda bs: wds.loader(
        urls, batch_size=bs, lanes=lanes, shuffle_buffer=shuffle_buffer, resampled=resampled, **kw))
    return data


def shapes_loader(batch_size: int, num_samples: int, resolution: int, seed: int, shuffle_buffer: int, resampled: bool,
                  num_workers: int, cache_dir: str, lanes: int | None, rank: int = 0, world_size: int = 1, teacher=None,
                  state: dict | None = None, endless: bool = True):
    """`data=shapes`: the embedded procedural dataset, written once as shards and read by the same loader."""
    from .shapes import ensure_shards

    wds.check_resolution(resolution)
    urls = ensure_shards(cache_dir, "train", num_samples, resolution, seed, samples_per_shard=100)
    data = wds.loader(urls, batch_size=batch_size, resolution=resolution, seed=seed, lanes=lanes, shuffle_buffer=shuffle_buffer,
                      resampled=resampled, num_workers=num_workers, rank=rank, world_size=world_size, state=state,
                      endless=endless)
    stream_of(data).eval_source = shapes_source(num_samples, resolution, seed, cache_dir)
    return data
