"""Data builders, one per option of `conf/data/`; each shares the signature
`build(batch_size, rank, world_size, **data_cfg) -> iterable of {"pixels", "captions", "n_skipped"}`."""
from __future__ import annotations

from . import wds
from .cached import cached_loader  # noqa: F401  (data=cached)


def webdataset_loader(batch_size: int, urls: str | None = None, rank: int = 0, world_size: int = 1, **cfg):
    """`data=webdataset`: real LAION-style shards (img2dataset layout) from `data.urls`."""
    return wds.loader(urls, batch_size=batch_size, rank=rank, world_size=world_size, **{"endless": True, **cfg})


def shapes_loader(batch_size: int, num_samples: int = 5000, resolution: int = 64, seed: int = 0,
                  cache_dir: str = "~/.cache/lcm_exp", rank: int = 0, world_size: int = 1, **cfg):
    """`data=shapes`: the embedded procedural dataset, written once as shards and read by the same loader."""
    from .shapes import ensure_shards

    cfg.pop("urls", None)
    urls = ensure_shards(cache_dir, "train", num_samples, resolution, seed)
    return wds.loader(urls, batch_size=batch_size, resolution=resolution, seed=seed, rank=rank,
                      world_size=world_size, **{"endless": True, **cfg})

