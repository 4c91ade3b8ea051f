"""WebDataset shards as img2dataset writes them → batches of (pixels in [-1, 1], captions).

Local paths, brace ranges, `pipe:` commands and object-store URLs all go
through `webdataset.WebDataset`. A corrupt sample or shard is skipped with a
warning and counted (`batch["n_skipped"]`, logged as `data/skipped`).
"""
from __future__ import annotations

import io
import json
import logging
import random
import warnings

import numpy as np
import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEYS = ("txt", "caption")


class _Skips:
    """Counts skipped samples in this (worker) process; each batch carries the count since the last one."""
    n = 0

    @classmethod
    def handler(cls, exn: Exception) -> bool:
        cls.n += 1
        warnings.warn(f"skipping a corrupt sample or shard: {type(exn).__name__}: {exn}", stacklevel=2)
        return True  # continue

    @classmethod
    def pop(cls) -> int:
        n, cls.n = cls.n, 0
        return n


def _decode(sample: dict):
    """Raw sample → (PIL image, caption, meta); None for the empty `{}` samples webdataset ≥0.2.96 emits."""
    img_key = next((k for k in IMAGE_KEYS if k in sample), None)
    txt_key = next((k for k in TEXT_KEYS if k in sample), None)
    if img_key is None or txt_key is None:
        if sample.get("__key__"):
            raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')} has no image or caption")
        return None
    image = Image.open(io.BytesIO(sample[img_key]))
    image.load()
    caption = sample[txt_key]
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return image.convert("RGB"), caption.strip(), meta


class Transform:
    """Resize the short side to `resolution`, crop (center or random), optionally flip; to [-1, 1] CHW."""

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False, seed: int = 0):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.rng = random.Random(seed)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.apply(image)[0]

    def apply(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """(pixels, (original height, original width, crop top, crop left)): SDXL's micro-conditioning."""
        r, (w, h) = self.resolution, image.size
        original = (h, w)
        scale = r / min(w, h)
        if (w, h) != (r, r):
            image = image.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        if self.center_crop:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left, top = self.rng.randint(0, w - r), self.rng.randint(0, h - r)
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and self.rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return x.float().div(127.5).sub(1.0), (*original, top, left)


def keep(meta: dict, image: Image.Image, min_size: int = 0, min_aesthetic: float | None = None,
         max_pwatermark: float | None = None) -> bool:
    """The LAION filters of the diffusers scripts, from each sample's json (falling back to the image size)."""
    w, h = meta.get("original_width", meta.get("width", image.width)), meta.get("original_height",
                                                                               meta.get("height", image.height))
    if min(w or 0, h or 0) < min_size:
        return False
    if min_aesthetic is not None and meta.get("aesthetic", meta.get("AESTHETIC_SCORE", 0.0)) < min_aesthetic:
        return False
    if max_pwatermark is not None and meta.get("pwatermark", 0.0) > max_pwatermark:
        return False
    return True


def _collate(samples):
    return {"pixels": torch.stack([s[0] for s in samples]), "captions": [s[1] for s in samples],
            "micro_conditioning": [s[2] for s in samples], "n_skipped": _Skips.pop()}


def webdataset(urls, seed: int, resampled: bool, **kwargs) -> wds.WebDataset:
    """`wds.WebDataset` whose resampled shard stream follows `seed`: WebDataset draws it from a
    `ResampledShards` seeded with the pid, the clock and os.urandom, so the same seed would not give the same
    run. Ours is `deterministic` (the seed, the epoch, and the rank/worker)."""
    ds = wds.WebDataset(urls, resampled=resampled, seed=seed, **kwargs)
    if resampled and isinstance(ds.pipeline[0], wds.ResampledShards):
        ds.pipeline[0] = wds.ResampledShards(urls, seed=seed, deterministic=True,
                                             empty_check=kwargs.get("empty_check", True))
    elif resampled:  # a directory or a dataset spec: webdataset draws from it its own way
        log.warning("data.urls=%s: its resampled shard order is webdataset's, not seeded by data.seed, so runs "
                    "will not repeat; give shard paths or a brace range for a reproducible stream", urls)
    return ds


def loader(urls, batch_size: int, resolution: int, seed: int = 0, shuffle_buffer: int = 1000, resampled: bool = True,
           center_crop: bool = True, random_flip: bool = False, min_size: int = 0, min_aesthetic: float | None = None,
           max_pwatermark: float | None = None, num_workers: int = 0, rank: int = 0, world_size: int = 1, **_):
    """An endless (resampled) or one-pass stream of collated batches."""
    if not urls:
        raise ValueError("data.urls is empty: give shards, e.g. data.urls='/data/laion/{00000..00099}.tar'")
    transform = Transform(resolution, center_crop, random_flip, seed=seed * 1000 + rank)

    def process(src):
        for sample in src:
            try:
                out = _decode(sample)
                if out is None:
                    continue
                image, caption, meta = out
                if keep(meta, image, min_size, min_aesthetic, max_pwatermark):
                    pixels, micro = transform.apply(image)
                    yield pixels, caption, micro
            except Exception as e:  # a corrupt image: skip it, count it
                _Skips.handler(e)

    ds = webdataset(urls, seed + rank, resampled, shardshuffle=False if resampled else 100, handler=_Skips.handler,
                    nodesplitter=(None if resampled else wds.split_by_node), empty_check=False)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, rng=random.Random(seed + rank))
    ds = ds.compose(process).batched(batch_size, collation_fn=_collate, partial=False)
    if num_workers > 0:
        return wds.WebLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=True, prefetch_factor=4)
    return ds
