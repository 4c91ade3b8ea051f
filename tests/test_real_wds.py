"""`data=webdataset` on shards the test writes: local + brace ranges + pipe:, the json filters, a corrupt
sample and a corrupt shard skipped with a warning and counted, and crop/flip that really act."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lcm_exp.data.wds import Transform, loader


def png(w: int, h: int) -> bytes:
    x = np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, 1, 3))  # a horizontal ramp
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    with wds.TarWriter(str(d / "shard-00000.tar")) as w:
        w.write({"__key__": "ok1", "png": png(48, 32), "txt": "ok one",
                 "json": json.dumps({"width": 48, "height": 32, "aesthetic": 6.0, "pwatermark": 0.1}).encode()})
        w.write({"__key__": "small", "png": png(16, 16), "txt": "too small", "json": b'{"width": 16, "height": 16}'})
        w.write({"__key__": "ugly", "png": png(48, 32), "txt": "low aesthetic", "json": b'{"aesthetic": 3.0}'})
        w.write({"__key__": "wm", "png": png(48, 32), "txt": "watermarked", "json": b'{"pwatermark": 0.9}'})
        w.write({"__key__": "bad", "jpg": b"not a jpeg at all", "txt": "corrupt image"})
    with wds.TarWriter(str(d / "shard-00001.tar")) as w:
        w.write({"__key__": "ok2", "png": png(40, 24), "caption": "ok two", "json": b'{"aesthetic": 7.5}'})
        w.write({"__key__": "ok3", "png": png(24, 40), "txt": "ok three"})  # no json: no aesthetic score
    (d / "shard-00002.tar").write_bytes(b"\x00garbage, not a tar file" * 50)  # a corrupt shard
    return d


FILTERS = dict(min_size=24, min_aesthetic=5.0, max_pwatermark=0.5)


def read_all(urls, **kw):
    captions, skipped = [], 0
    for batch in loader(urls, batch_size=1, resolution=16, resampled=False, shuffle_buffer=0, **kw):
        assert batch["pixels"].shape == (1, 3, 16, 16) and batch["pixels"].abs().max() <= 1
        captions += batch["captions"]
        skipped += batch["n_skipped"]
    return captions, skipped


def test_brace_range_filters_and_corrupt_sample_and_shard(shards):
    with pytest.warns(UserWarning, match="skipping a corrupt sample or shard"):  # (a skip is counted with the
        # next sample read: the corrupt shard comes first here)
        captions, skipped = read_all([str(shards / "shard-00002.tar"), str(shards / "shard-{00000..00001}.tar")],
                                     **FILTERS)
    # small, ugly, watermarked filtered out; ok3 has no aesthetic score, so it fails min_aesthetic
    assert sorted(captions) == ["ok one", "ok two"]
    assert skipped >= 2  # the corrupt image and the corrupt shard, counted for `data/skipped`
    captions, _ = read_all(str(shards / "shard-{00000..00002}.tar"))  # no filters: only the corrupt one is lost
    assert len(captions) == 6


def test_pipe_urls(shards):
    captions, skipped = read_all(f"pipe:cat {shards / 'shard-00001.tar'}")
    assert sorted(captions) == ["ok three", "ok two"] and skipped == 0


def test_resampled_stream_is_endless_and_shuffled(shards):
    it = iter(loader(str(shards / "shard-{00000..00001}.tar"), batch_size=2, resolution=16, resampled=True,
                     shuffle_buffer=4, seed=3, **FILTERS))
    captions = [c for _ in range(6) for c in next(it)["captions"]]  # more than one pass over 2 samples
    assert len(captions) == 12 and set(captions) == {"ok one", "ok two"}


def test_resampled_stream_follows_its_seed(shards):
    """The same seed gives the same stream (webdataset's own resampler mixes in the pid, the clock and urandom)."""
    def stream(seed):
        it = iter(loader(str(shards / "shard-{00000..00001}.tar"), batch_size=1, resolution=16, resampled=True,
                         shuffle_buffer=0, seed=seed, lanes=2))
        return [next(it)["captions"][0] for _ in range(24)]

    first = stream(3)
    assert stream(3) == first and stream(4) != first
    assert len(set(first)) == 6  # (both shards drawn)


def test_cached_stream_is_seeded_and_runs_on_every_rank(tmp_path, monkeypatch):
    """`data=cached` shards: the same seed gives the same stream, and a second rank of a multi-process run reads
    its share of the stream: every other sample, its own lane's."""
    from lcm_exp.data.cached import _npy, loader as cached_loader
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"cached-{shard:05d}.tar")) as w:
            for i in range(3):
                w.write({"__key__": f"{shard}-{i}", "mean.npy": _npy(torch.zeros(4, 2, 2)), "std.npy": _npy(torch.ones(4, 2, 2)),
                         "emb.npy": _npy(torch.zeros(3, 8)), "txt": f"caption {shard}-{i}"})
    urls = str(tmp_path / "cached-{00000..00001}.tar")

    def stream(seed, rank=0, world_size=1):
        it = iter(cached_loader(urls, batch_size=1, resolution=8, seed=seed, shuffle_buffer=2, rank=rank,
                                world_size=world_size, lanes=2))
        return [next(it)["captions"][0] for _ in range(18)]

    first = stream(3)
    assert stream(3) == first and stream(4) != first and len(set(first)) == 6
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert stream(3, rank=1, world_size=2)[:9] == first[1::2]  # rank 1 of 2: every other sample of the stream


def test_crop_and_flip_really_act():
    img = Image.open(io.BytesIO(png(48, 32)))  # resized to 24x16, then cropped to 16x16
    resized = torch.from_numpy(np.asarray(img.resize((24, 16), Image.BICUBIC), dtype=np.float32)).permute(2, 0, 1)
    resized = resized / 127.5 - 1
    center, micro = Transform(16, center_crop=True).apply(img)
    assert micro == (32, 48, 0, 4) and torch.allclose(center, resized[:, :, 4:20], atol=1e-6)
    lefts = set()
    for seed in range(8):
        x, (_, _, top, left) = Transform(16, center_crop=False, seed=seed).apply(img)
        assert top == 0 and torch.allclose(x, resized[:, :, left:left + 16], atol=1e-6)
        lefts.add(left)
    assert len(lefts) > 1  # random crops move
    flips = Transform(16, center_crop=True, random_flip=True, seed=0)
    outs = [flips(img) for _ in range(16)]
    flipped = [torch.allclose(o, center.flip(-1), atol=1e-6) for o in outs]
    same = [torch.allclose(o, center, atol=1e-6) for o in outs]
    assert any(flipped) and any(same) and all(f or s for f, s in zip(flipped, same))
