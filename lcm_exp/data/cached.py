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
import shutil
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from .stream import ShardStream, batches, usable_workers

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


def _array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode(sample: dict, rng=None):
    """A cached sample → its posterior mean and std, text embedding and caption (raises for a corrupt one)."""
    if "mean.npy" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} is not a data=cached sample "
                         "(no mean.npy): make the shards with lcm-exp-precompute")
    txt = sample.get("txt", b"")
    return (_array(sample["mean.npy"]), _array(sample["std.npy"]), _array(sample["emb.npy"]),
            txt.decode("utf-8") if isinstance(txt, bytes) else str(txt))


def collate(items) -> dict:
    stack = lambda i: torch.from_numpy(np.stack([s[i] for s in items])).float()  # noqa: E731
    return {"latent_mean": stack(0), "latent_std": stack(1), "encoder_hidden_states": stack(2),
            "captions": [s[3] for s in items]}


def loader(urls, batch_size: int, resolution: int, seed: int = 0, shuffle_buffer: int = 16, rank: int = 0,
           world_size: int = 1, resampled: bool = False, num_workers: int = 0, state: dict | None = None,
           lanes: int | None = None):
    """An endless, resumable stream of cached batches (`lcm_exp.data.stream`)."""
    return batches(ShardStream(urls, decode, collate, batch_size, seed=seed, rank=rank, world_size=world_size,
                               lanes=lanes, shuffle_buffer=shuffle_buffer, resampled=resampled, resolution=resolution,
                               num_workers=usable_workers(num_workers), state=state))


def cached_loader(batch_size: int, urls: str | None, resolution: int, num_samples: int, seed: int,
                  shuffle_buffer: int, resampled: bool, num_workers: int, cache_dir: str, lanes: int | None, rank: int = 0,
                  world_size: int = 1, teacher=None, state: dict | None = None, endless: bool = True):
    """`data=cached`: `data.urls` of precomputed shards, or (urls null) the shapes dataset precomputed once for
    this teacher into `data.cache_dir`."""
    from .sources import EvalSource, shapes_source, stream_of

    source = None
    if not urls:
        if teacher is None:
            raise ValueError("data=cached without data.urls needs the teacher to precompute the shapes dataset")
        from .sources import shapes_loader

        key = hashlib.sha1(json.dumps([str(teacher.path), num_samples, resolution, seed]).encode()).hexdigest()[:10]
        out = Path(cache_dir).expanduser() / f"cached-shapes-{key}"
        if not (out / "done.json").exists():
            src = shapes_loader(batch_size=50, num_samples=num_samples, resolution=resolution, seed=seed,
                                shuffle_buffer=0, resampled=False, num_workers=0, cache_dir=cache_dir, lanes=1,
                                endless=False)
            precompute(teacher, src, out, num_samples)
        urls = sorted(str(p) for p in out.glob("cached-*.tar"))
        source = shapes_source(num_samples, resolution, seed, cache_dir)
    data = loader(urls, batch_size, resolution, seed=seed, shuffle_buffer=shuffle_buffer, rank=rank,
                  world_size=world_size, resampled=resampled, num_workers=num_workers, state=state, lanes=lanes)
    stream_of(data).eval_source = source or EvalSource(None, False, lambda bs: loader(
        urls, bs, resolution, seed=seed, shuffle_buffer=shuffle_buffer, resampled=resampled, lanes=lanes))
    return data
