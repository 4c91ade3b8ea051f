"""WebDataset shards as img2dataset writes them → batches of (pixels in [-1, 1], captions).

Local paths, brace ranges, `pipe:` commands and object-store URLs all go through webdataset's tar reader
(`lcm_exp.data.stream`, which also makes the stream resumable). A corrupt sample or shard is skipped with a
warning and counted (`batch["n_skipped"]`, logged as `data/skipped`); shards none of whose samples can be read
(no caption field at all, not tar files) end the run with a message that names the failure.
"""
from __future__ import annotations

import io
import json
import logging
import random

import numpy as np
import torch
from PIL import Image

from .stream import DataError, Rejected, ShardStream, batches, usable_workers

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEYS = ("txt", "caption", "text")  # the diffusers scripts read text;txt;caption


def _fields(sample: dict):
    """(image key, caption, meta) of a raw sample; a sample without an image or a caption raises, naming its
    fields."""
    img_key = next((k for k in IMAGE_KEYS if k in sample), None)
    txt_key = next((k for k in TEXT_KEYS if k in sample), None)
    if img_key is None or txt_key is None:
        fields = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
        missing = "image" if img_key is None else "caption"
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no {missing} (its fields: "
                         f"{fields}; expected one of {', '.join(IMAGE_KEYS if img_key is None else TEXT_KEYS)})")
    caption = sample[txt_key]
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return img_key, caption.strip(), meta


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


class Transform:
    """Resize the short side to `resolution`, crop (center or random), optionally flip; to [-1, 1] CHW.
    The random crop and flip draw from the `rng` given with each image (the stream's per-sample generator)."""

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False, seed: int = 0):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.rng = random.Random(seed)  # used when no rng is given

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.apply(image)[0]

    def apply(self, image: Image.Image, rng: random.Random | None = None):
        """(pixels, (original height, original width, crop top, crop left)): SDXL's micro-conditioning."""
        rng = rng or self.rng
        r, (w, h) = self.resolution, image.size
        original = (h, w)
        scale = r / min(w, h)
        if (w, h) != (r, r):
            image = image.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        if self.center_crop:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return x.float().div(127.5).sub(1.0), (*original, top, left)


def rejection(meta: dict, size: tuple[int, int] | None, min_size: int = 0, min_aesthetic: float | None = None,
              max_pwatermark: float | None = None) -> str | None:
    """Why the LAION filters of the diffusers scripts reject a sample (naming the filter and what the sample's json
    holds), or None to keep it. `size`: the image's (width, height), for a json without them (None: not known
    yet, decode the image and ask again)."""
    w = meta.get("original_width", meta.get("width"))
    h = meta.get("original_height", meta.get("height"))
    if min_size and (w is None or h is None):
        if size is None:
            return None
        w, h = size
    if min_size and min(w or 0, h or 0) < min_size:
        return f"data.min_size={min_size}: the image is {w}x{h}"
    if min_aesthetic is not None:
        score = meta.get("aesthetic", meta.get("AESTHETIC_SCORE"))
        if score is None:
            return f"data.min_aesthetic={min_aesthetic}: no aesthetic score in its json (fields: " \
                   f"{', '.join(sorted(meta)) or 'no json'})"
        if score < min_aesthetic:
            return f"data.min_aesthetic={min_aesthetic}: its aesthetic score is below it"
    if max_pwatermark is not None and meta.get("pwatermark", 0.0) > max_pwatermark:
        return f"data.max_pwatermark={max_pwatermark}: its pwatermark is above it"
    return None


class ImageSamples:
    """decode(sample, rng) for ShardStream: (pixels, caption, micro-conditioning). The filters read the json first
    (a rejected sample's image is never decoded) and raise `Rejected` with the reason."""

    def __init__(self, transform: Transform, **filters):
        self.transform, self.filters = transform, filters

    def __call__(self, sample: dict, rng: random.Random):
        img_key, caption, meta = _fields(sample)
        why = rejection(meta, None, **self.filters)
        if why:
            raise Rejected(why)
        image = _image(sample[img_key])
        why = rejection(meta, image.size, **self.filters)
        if why:
            raise Rejected(why)
        pixels, micro = self.transform.apply(image, rng)
        return pixels, caption, micro


def collate(items) -> dict:
    return {"pixels": torch.stack([s[0] for s in items]), "captions": [s[1] for s in items],
            "micro_conditioning": [s[2] for s in items]}


def check_resolution(resolution: int) -> None:
    if resolution < 8 or resolution % 8:
        from ..config import invalid

        raise invalid("data.resolution", resolution, "a multiple of 8")


def loader(urls, batch_size: int, resolution: int, seed: int = 0, shuffle_buffer: int = 16, resampled: bool = False,
           center_crop: bool = True, random_flip: bool = False, min_size: int = 0, min_aesthetic: float | None = None,
           max_pwatermark: float | None = None, num_workers: int = 0, rank: int = 0, world_size: int = 1,
           state: dict | None = None, endless: bool | None = None, lanes: int | None = None):
    """Batches from image shards, resumable from `state` (`ShardStream.state`): an endless stream (resampled, or
    with `endless=True` epochs over the shards), or one pass in shard order (`resampled=False`, `endless` unset)."""
    check_resolution(resolution)
    if not urls:
        raise DataError("data.urls must be set: give the shards, e.g. "
                        "data.urls='/data/laion/{00000..00099}.tar' (brace ranges, pipe: and s3:// URLs work too)")
    decode = ImageSamples(Transform(resolution, center_crop, random_flip), min_size=min_size,
                          min_aesthetic=min_aesthetic, max_pwatermark=max_pwatermark)
    return batches(ShardStream(urls, decode, collate, batch_size, seed=seed, rank=rank, world_size=world_size,
                               lanes=lanes, shuffle_buffer=shuffle_buffer, resampled=resampled, resolution=resolution,
                               epochs=None if endless or resampled else 1, num_workers=usable_workers(num_workers),
                               state=state, partial=not (endless or resampled)))
