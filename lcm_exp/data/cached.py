"""`data=cached`: the teacher's VAE posterior and text embeddings computed once and stored as WebDataset shards,
so that training skips the VAE and the text encoder (step 1 of Alg. 1) on every step.

Each sample holds `mean.npy` and `std.npy` (the VAE posterior, fp16; a fresh latent is drawn from it every
step, as `latent_dist.sample()` does), `emb.npy` (the text encoder's last hidden state, fp16) and `txt`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from .wds import webdataset

log = logging.getLogger(__name__)


def _npy(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.detach().to("cpu", torch.float16).numpy())
    return buf.getvalue()


@torch.no_grad()
def precompute(teacher, batches, out_dir: str | os.PathLike, num_samples: int, samples_per_shard: int = 1000) -> list[str]:
    """One pass over `batches` ({"pixels", "captions"}) → shards in `out_dir` (written to a temp folder first)."""
    if getattr(teacher, "text_encoder_2", None) is not None:
        raise ValueError("data=cached stores one text embedding per sample: SD-1.x/2.x teachers only")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    n = 0
    with wds.ShardWriter(str(tmp / "cached-%05d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for batch in batches:
            posterior = teacher.vae.encode(batch["pixels"].to(teacher.vae.device, teacher.vae.dtype)).latent_dist
            emb = teacher.encode_prompts(batch["captions"])["encoder_hidden_states"]
            for i, caption in enumerate(batch["captions"]):
                sink.write({"__key__": f"{n:08d}", "mean.npy": _npy(posterior.mean[i]), "std.npy": _npy(posterior.std[i]),
                            "emb.npy": _npy(emb[i]), "txt": caption})
                n += 1
                if n >= num_samples:
                    break
            if n >= num_samples:
                break
    (tmp / "done.json").write_text(json.dumps({"num_samples": n, "teacher": teacher.path}))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("precomputed %d samples into %s", n, out_dir)
    return sorted(str(p) for p in out_dir.glob("cached-*.tar"))


def _collate(samples):
    stack = lambda k: torch.from_numpy(np.stack([s[k] for s in samples])).float()  # noqa: E731
    return {"latent_mean": stack("mean.npy"), "latent_std": stack("std.npy"), "encoder_hidden_states": stack("emb.npy"),
            "captions": [s["txt"] for s in samples], "n_skipped": 0}


def loader(urls, batch_size: int, seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0, **_):
    ds = webdataset(urls, seed + rank, resampled=True, shardshuffle=False, empty_check=False, nodesplitter=None,
                    handler=wds.warn_and_continue)  # (each rank draws its own resampled stream, as wds.loader's)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, rng=random.Random(seed + rank))
    return ds.select(lambda s: "mean.npy" in s).decode().batched(batch_size, collation_fn=_collate, partial=False)


def cached_loader(batch_size: int, teacher=None, urls: str | None = None, num_samples: int = 5000, resolution: int = 64,
                  seed: int = 0, cache_dir: str = "~/.cache/lcm_exp", rank: int = 0, world_size: int = 1, **cfg):
    """`data=cached`: `data.urls` of precomputed shards, or (urls null) the shapes dataset precomputed once for
    this teacher into `data.cache_dir`."""
    if not urls:
        if teacher is None:
            raise ValueError("data=cached without data.urls needs the teacher to precompute the shapes dataset")
        from . import shapes_loader

        key = hashlib.sha1(json.dumps([str(teacher.path), num_samples, resolution, seed]).encode()).hexdigest()[:10]
        out = Path(cache_dir).expanduser() / f"cached-shapes-{key}"
        if not (out / "done.json").exists():
            src = shapes_loader(batch_size=50, num_samples=num_samples, resolution=resolution, seed=seed,
                                cache_dir=cache_dir, resampled=False, shuffle_buffer=0)
            precompute(teacher, src, out, num_samples)
        urls = sorted(str(p) for p in out.glob("cached-*.tar"))
    return loader(urls, batch_size, seed=seed, rank=rank, **cfg)
