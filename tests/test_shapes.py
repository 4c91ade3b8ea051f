"""The embedded shapes dataset (lcm_exp.data.shapes) and its adherence checker (lcm_exp.data.adherence)."""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from lcm_exp.data.adherence import adherence_rate, attribute_rates, check, detect
from lcm_exp.data.shapes import (ALL_SCENES, BACKGROUNDS, COLOURS, KINDS, POSITIONS, SIZES, Scene,
                                 caption, ensure_shards, eval_prompts, parse_caption, render,
                                 sample_scene, scenes, split_of, write_shards)

OPTIONS = {"kind": KINDS, "colour": tuple(COLOURS), "size": SIZES, "position": POSITIONS,
           "background": tuple(BACKGROUNDS)}


def _shapes_module():
    # by module path: the package attribute `lcm_exp.data.shapes` may be the data builder function
    return importlib.import_module("lcm_exp.data.shapes")


# --- scenes, captions, splits ---------------------------------------------------------------

def test_caption_round_trip_for_every_scene():
    captions = [caption(s) for s in ALL_SCENES]
    assert len(ALL_SCENES) == 4 * 6 * 2 * 9 * 6
    assert len(set(captions)) == len(captions)
    for scene, text in zip(ALL_SCENES, captions):
        assert parse_caption(text) == scene
        assert text == text.lower() and len(text) < 70
    assert caption(Scene("triangle", "red", "small", "top left", "white")) == \
        "a small red triangle in the top left on a white background"
    assert parse_caption("  A Small RED triangle in the top left on a white background ") == \
        Scene("triangle", "red", "small", "top left", "white")
    for bad in ("a small red hexagon in the top left on a white background", "", "a red circle"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_splits_are_disjoint_and_deterministic():
    train = {caption(s) for s in scenes("train", 3000, seed=0)}
    held_out = {caption(s) for s in scenes("eval", 500, seed=0)}
    assert train and held_out and not train & held_out
    assert all(split_of(t) == "train" for t in train) and all(split_of(t) == "eval" for t in held_out)
    n_eval = sum(split_of(s) == "eval" for s in ALL_SCENES)
    assert 0.07 < n_eval / len(ALL_SCENES) < 0.13
    assert scenes("train", 50, seed=7) == scenes("train", 50, seed=7) != scenes("train", 50, seed=8)
    prompts = eval_prompts(100, seed=0)
    assert len(set(prompts)) == 100 and all(split_of(p) == "eval" for p in prompts)
    assert prompts == eval_prompts(100, seed=0) != eval_prompts(100, seed=1)
    assert set(eval_prompts(n_eval)) == {caption(s) for s in ALL_SCENES if split_of(s) == "eval"}
    with pytest.raises(ValueError):
        eval_prompts(n_eval + 1)
    with pytest.raises(ValueError):
        scenes("test", 1, seed=0)


def test_render_is_deterministic_and_varies_with_jitter():
    scene = sample_scene(random.Random(3))
    a, b = render(scene, 64, random.Random(5)), render(scene, 64, random.Random(5))
    assert a.mode == "RGB" and a.size == (64, 64)
    assert a.tobytes() == b.tobytes()
    assert render(scene, 64).tobytes() == render(scene, 64).tobytes()
    jittered = {render(scene, 64, random.Random(i)).tobytes() for i in range(5)}
    assert len(jittered) == 5


# --- shards ---------------------------------------------------------------------------------

def _read_samples(urls):
    import webdataset as wds

    out = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if "__key__" in sample and "png" in sample:  # some webdataset versions yield a trailing {}
            out.append(sample)
    return out


def test_write_shards_reads_back_as_img2dataset_layout(tmp_path):
    paths = write_shards(tmp_path / "ds", "train", 250, 32, seed=1, samples_per_shard=100)
    assert [os.path.basename(p) for p in paths] == [f"shapes-train-{i:05d}.tar" for i in range(3)]
    samples = _read_samples(paths)
    assert len(samples) == 250 and len({s["__key__"] for s in samples}) == 250
    expected = scenes("train", 250, seed=1)
    for sample, scene in zip(samples, expected):
        text, meta = sample["txt"].decode(), json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["png"]))
        assert text == caption(scene) and parse_caption(text) == scene
        assert image.size == (32, 32) and image.mode == "RGB"
        assert (meta["width"], meta["height"], meta["aesthetic"], meta["pwatermark"]) == (32, 32, 6.5, 0.0)
        assert {k: meta[k] for k in OPTIONS} == dataclasses.asdict(scene)
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # no temporary folder left behind

    # the same arguments give the same bytes; another split has only held-out captions
    again = write_shards(tmp_path / "again", "train", 250, 32, seed=1, samples_per_shard=100)
    assert [open(p, "rb").read() for p in paths] == [open(p, "rb").read() for p in again]
    held_out = _read_samples(write_shards(tmp_path / "eval", "eval", 40, 32, seed=1))
    assert len(held_out) == 40 and all(split_of(s["txt"].decode()) == "eval" for s in held_out)


def test_write_shards_is_atomic(tmp_path, monkeypatch):
    shapes_module = _shapes_module()
    real_render, calls = shapes_module.render, []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 30:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(shapes_module, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path / "ds", "train", 100, 16, samples_per_shard=10)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(shapes_module, "render", real_render)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError):
        write_shards(tmp_path / "mine", "train", 10, 16)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_ensure_shards_reuses_a_complete_dataset(tmp_path, monkeypatch):
    shapes_module = _shapes_module()
    first = ensure_shards(tmp_path, "train", 120, 32, seed=0)
    mtimes = [os.stat(p).st_mtime_ns for p in first]
    monkeypatch.setattr(shapes_module, "_write_samples", lambda *a: pytest.fail("rewrote the dataset"))
    second = ensure_shards(str(tmp_path), "train", 120, 32, seed=0)
    assert second == first and [os.stat(p).st_mtime_ns for p in second] == mtimes
    assert len(_read_samples(second)) == 120
    monkeypatch.undo()
    other = ensure_shards(tmp_path, "train", 120, 32, seed=1)
    assert os.path.dirname(other[0]) != os.path.dirname(first[0])
    assert len([d for d in os.listdir(tmp_path) if d.startswith("shapes-")]) == 2


# --- adherence checker ----------------------------------------------------------------------

def _dataset(resolution, n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append((scene, render(scene, resolution, rng)))
    return out


@pytest.fixture(scope="module")
def images64():
    return _dataset(64, 400, seed=11)


@pytest.fixture(scope="module")
def images32():
    return _dataset(32, 400, seed=12)


def test_checker_accepts_rendered_images(images64, images32):
    rates64 = attribute_rates([im for _, im in images64], [caption(s) for s, _ in images64])
    rates32 = attribute_rates([im for _, im in images32], [caption(s) for s, _ in images32])
    print("clean 64px", rates64, "clean 32px", rates32)
    assert rates64["all"] >= 0.99
    assert rates32["all"] >= 0.97
    assert min(rates64.values()) >= 0.99 and min(rates32.values()) >= 0.97


def test_checker_rejects_one_attribute_mismatches(images64, images32):
    rng = random.Random(0)
    rejected = {a: [] for a in OPTIONS}
    for scene, image in images64[:200] + images32[:150]:
        attr = rng.choice(list(OPTIONS))
        wrong = dataclasses.replace(scene, **{attr: rng.choice([v for v in OPTIONS[attr] if v != getattr(scene, attr)])})
        result = check(image, caption(wrong))
        rejected[attr].append(not result["shape" if attr == "kind" else attr])
        assert not result["all"]
    rates = {a: sum(r) / len(r) for a, r in rejected.items()}
    print("mismatch rejection", rates)
    assert all(len(r) >= 40 for r in rejected.values())
    assert min(rates.values()) >= 0.95


def test_checker_is_robust_to_noise_and_blur(images64):
    noise = np.random.default_rng(0)
    degraded, captions = [], []
    for scene, image in images64[:250]:
        a = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), np.float64) / 255
        a = np.clip(a + noise.normal(0, 0.05, a.shape), 0, 1)
        degraded.append((a * 255 + 0.5).astype(np.uint8))
        captions.append(caption(scene))
    rate = adherence_rate(degraded, captions)
    print("noisy 64px", rate)
    assert rate >= 0.95


def test_checker_input_formats(images64):
    scenes_, images = zip(*images64[:6])
    captions = [caption(s) for s in scenes_]
    arrays = [np.asarray(im) for im in images]
    batch = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays])
    assert [detect(a) for a in arrays] == [detect(im) for im in images] == [detect(t) for t in batch] \
        == list(scenes_)
    assert adherence_rate(batch, captions) == 1.0
    assert attribute_rates(batch, captions[::-1])["all"] < 1.0
    blank = check(np.full((64, 64, 3), 255, np.uint8), captions[0])
    assert blank["shape"] is False and blank["all"] is False
    with pytest.raises(ValueError):
        check(arrays[0], "a photo of a cat")
