"""The embedded "shapes" text-to-image dataset: procedural, deterministic, tiny.

A scene is one coloured shape (circle, square, triangle or cross), small or
large, in one cell of a 3x3 grid, on a plain or two-tone background, e.g.
"a small red triangle in the top left on a white background" or
"a large cyan cross on the right on black and white halves".

Captions map one-to-one to scenes (`caption` / `parse_caption`). The split is a
property of the caption: about one caption in ten (by a stable hash) is held
out for evaluation and never appears in training data.

`write_shards` writes WebDataset shards in the img2dataset layout (`png`, `txt`,
`json` with width, height, aesthetic, pwatermark and the scene attributes), so
the generic webdataset loader reads them like any LAION-style shards;
`ensure_shards` caches such a dataset by its parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Bump when rendering or sampling changes, so that cached datasets are rebuilt.
DATASET_VERSION = 1

KINDS = ("circle", "square", "triangle", "cross")
#: Shape colours: far apart from each other and from every background colour.
COLOURS = {
    "red": (220, 30, 30),
    "green": (20, 170, 40),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (170, 40, 210),
    "cyan": (20, 190, 210),
}
BACKGROUND_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
#: Background name -> its colours; two colours means two halves (the split
#: orientation and order are rendering jitter, not part of the scene).
BACKGROUNDS = {
    "white": ("white",),
    "black": ("black",),
    "gray": ("gray",),
    "black and white": ("black", "white"),
    "gray and white": ("gray", "white"),
    "black and gray": ("black", "gray"),
}
SIZES = ("small", "large")
#: Row-major cells of the 3x3 grid.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
_POSITION_PHRASES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
                     "right": "on the right", "center": "in the center"}

#: Shape extent (bounding-box side) as a fraction of a grid cell, per size.
SIZE_RANGES = {"small": (0.42, 0.52), "large": (0.78, 0.92)}
#: Area of each shape over the area of its bounding box.
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
#: Vertical offset of the area centroid below the bounding-box centre, in extents.
CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0}
_SUPERSAMPLE = 4
_CELL_MARGIN = 0.04  # the shape keeps this fraction of a cell away from the cell's border


@dataclass(frozen=True)
class Scene:
    """One shape scene; every field is one of the names in this module's tables."""

    kind: str
    colour: str
    size: str
    position: str
    background: str


def caption(scene: Scene) -> str:
    """The scene's caption: lower case, short (< 70 characters), one per scene."""
    where = _POSITION_PHRASES.get(scene.position, f"in the {scene.position}")
    if len(BACKGROUNDS[scene.background]) == 1:
        on = f"a {scene.background} background"
    else:
        on = f"{scene.background} halves"
    return f"a {scene.size} {scene.colour} {scene.kind} {where} on {on}"


#: Every scene, in a fixed order.
ALL_SCENES = tuple(Scene(*attrs) for attrs in itertools.product(
    KINDS, COLOURS, SIZES, POSITIONS, BACKGROUNDS))
_SCENE_OF_CAPTION = {caption(s): s for s in ALL_SCENES}


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (inverse of `caption`); ValueError if none."""
    try:
        return _SCENE_OF_CAPTION[" ".join(str(text).lower().split())]
    except KeyError:
        raise ValueError(f"not a shapes caption: {text!r}") from None


def split_of(scene: Scene | str) -> str:
    """'eval' for the held-out tenth of captions (stable hash), else 'train'."""
    text = scene if isinstance(scene, str) else caption(scene)
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % 10 == 0 else "train"


def sample_scene(rng: random.Random) -> Scene:
    """A scene with every attribute drawn uniformly (from either split)."""
    return Scene(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(SIZES),
                 rng.choice(POSITIONS), rng.choice(list(BACKGROUNDS)))


def scenes(split: str, num: int, seed: int) -> list[Scene]:
    """`num` scenes drawn uniformly from `split` ('train' or 'eval'), determined by `seed`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    rng, out = random.Random(seed), []
    while len(out) < num:
        scene = sample_scene(rng)
        if split_of(scene) == split:
            out.append(scene)
    return out


def eval_prompts(num: int, seed: int = 0) -> list[str]:
    """`num` distinct held-out captions, in an order determined by `seed`."""
    pool = [caption(s) for s in ALL_SCENES if split_of(s) == "eval"]
    if num > len(pool):
        raise ValueError(f"only {len(pool)} held-out prompts exist, asked for {num}")
    random.Random(seed).shuffle(pool)
    return pool[:num]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, extent: float, fill) -> None:
    """Draw `kind` with its bounding box of side `extent` centred at (cx, cy)."""
    h = extent / 2
    x0, y0, x1, y1 = cx - h, cy - h, cx + h, cy + h
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif kind == "cross":
        arm = extent / 6
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=fill)
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def shape_alpha(kind: str, cx: float, cy: float, extent: float, resolution: int) -> np.ndarray:
    """Coverage in [0, 1] (resolution x resolution) of a shape drawn as `render` draws it.

    (cx, cy) is the bounding-box centre and `extent` its side, in pixels
    (pixel i spans [i, i + 1)).
    """
    s, pad = _SUPERSAMPLE, 4  # pad > LANCZOS support: the crop renders exactly like a full image
    out = np.zeros((resolution, resolution))
    x0, y0 = (max(0, math.floor(c - extent / 2) - pad) for c in (cx, cy))
    x1, y1 = (min(resolution, math.ceil(c + extent / 2) + pad) for c in (cx, cy))
    if x1 > x0 and y1 > y0:
        canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
        _draw_shape(ImageDraw.Draw(canvas), kind, (cx - x0) * s, (cy - y0) * s, extent * s, 255)
        out[y0:y1, x0:x1] = np.asarray(canvas.resize((x1 - x0, y1 - y0), Image.LANCZOS)) / 255.0
    return out


def render(scene: Scene, resolution: int, rng: random.Random | None = None) -> Image.Image:
    """Render `scene` as an RGB image, drawn at 4x and downsampled with LANCZOS.

    Without `rng` the shape sits in the middle of its cell at the middle of its
    size range and a two-tone background is split top (first colour) / bottom.
    With `rng`, the size, the position within the cell and the split
    (horizontal or vertical, either order) are jittered.
    """
    s = _SUPERSAMPLE
    side = resolution * s
    bg = [BACKGROUND_COLOURS[c] for c in BACKGROUNDS[scene.background]]
    vertical = False
    if len(bg) == 2 and rng is not None:
        vertical = rng.random() < 0.5
        if rng.random() < 0.5:
            bg = bg[::-1]
    img = Image.new("RGB", (side, side), bg[0])
    draw = ImageDraw.Draw(img)
    if len(bg) == 2:
        half = (side // 2, 0, side, side) if vertical else (0, side // 2, side, side)
        draw.rectangle(half, fill=bg[1])

    lo, hi = SIZE_RANGES[scene.size]
    cell = side / 3
    extent = (rng.uniform(lo, hi) if rng is not None else (lo + hi) / 2) * cell
    slack = max(0.0, (cell - extent) / 2 - _CELL_MARGIN * cell)
    row, col = divmod(POSITIONS.index(scene.position), 3)
    dx, dy = (0.0, 0.0) if rng is None else (rng.uniform(-slack, slack), rng.uniform(-slack, slack))
    _draw_shape(draw, scene.kind, (col + 0.5) * cell + dx, (row + 0.5) * cell + dy, extent,
                COLOURS[scene.colour])
    return img.resize((resolution, resolution), Image.LANCZOS)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _params(split, num_samples, resolution, seed, samples_per_shard) -> dict:
    return {"dataset": "shapes", "version": DATASET_VERSION, "split": split,
            "num_samples": int(num_samples), "resolution": int(resolution),
            "seed": int(seed), "samples_per_shard": int(samples_per_shard)}


def _read_done(out_dir: str, params: dict) -> list[str] | None:
    """The shard paths of a complete dataset with `params` in `out_dir`, else None."""
    try:
        with open(os.path.join(out_dir, "done.json")) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    paths = [os.path.join(out_dir, name) for name in done.get("shards", [])]
    if done.get("params") != params or not paths or not all(map(os.path.isfile, paths)):
        return None
    return paths


def _write(out_dir: str, params: dict, replace: bool) -> list[str]:
    """Write the dataset into a temporary sibling folder, then rename it to `out_dir`."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=os.path.dirname(out_dir))
    try:
        _write_samples(tmp, params)
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            if not os.path.exists(os.path.join(out_dir, "done.json")):
                raise FileExistsError(f"{out_dir} exists and is not a shapes dataset")
            if not replace and (paths := _read_done(out_dir, params)) is not None:
                return paths  # another process finished the same dataset first
            shutil.rmtree(out_dir)
        elif os.path.isdir(out_dir):
            os.rmdir(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # lost a race with a concurrent writer of the same dataset
            if replace or _read_done(out_dir, params) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    paths = _read_done(out_dir, params)
    assert paths is not None, f"incomplete dataset in {out_dir}"
    return paths


def _write_samples(folder: str, params: dict) -> None:
    import webdataset as wds  # only needed to write shards

    split, res = params["split"], params["resolution"]
    pattern = os.path.join(folder.replace("%", "%%"), f"shapes-{split}-%05d.tar")
    jitter = random.Random(f"shapes/{split}/{params['seed']}/jitter")
    with wds.ShardWriter(pattern, maxcount=params["samples_per_shard"], verbose=0, mtime=0.0) as sink:
        for i, scene in enumerate(scenes(split, params["num_samples"], params["seed"])):
            key, text = f"{i:09d}", caption(scene)
            meta = {"width": res, "height": res, "aesthetic": 6.5, "pwatermark": 0.0,
                    "key": key, "caption": text, **dataclasses.asdict(scene)}
            sink.write({"__key__": key, "png": _png_bytes(render(scene, res, jitter)),
                        "txt": text.encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    with open(os.path.join(folder, "done.json"), "w") as f:
        json.dump({"params": params, "shards": shards}, f, indent=1)


def write_shards(out_dir: str, split: str, num_samples: int, resolution: int, seed: int = 0,
                 samples_per_shard: int = 1000) -> list[str]:
    """Write `num_samples` scenes of `split` as WebDataset shards `shapes-{split}-%05d.tar`.

    The shards are written to a temporary folder that is renamed to `out_dir`
    when complete (with a `done.json` marker), so an interrupted write never
    leaves a partial dataset. A previous shapes dataset in `out_dir` is
    replaced; any other non-empty `out_dir` raises FileExistsError. The same
    arguments give the same bytes. Returns the shard paths, in order.
    """
    params = _params(split, num_samples, resolution, seed, samples_per_shard)
    scenes(split, 0, seed)  # validate the split before creating anything
    return _write(out_dir, params, replace=True)


def ensure_shards(cache_dir: str, split: str, num_samples: int, resolution: int, seed: int = 0,
                  samples_per_shard: int = 1000) -> list[str]:
    """Shard paths of the dataset with these parameters in `cache_dir/shapes-<hash>/`.

    Reuses a complete dataset when one is there, otherwise writes it.
    """
    params = _params(split, num_samples, resolution, seed, samples_per_shard)
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    out_dir = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"shapes-{digest}")
    paths = _read_done(out_dir, params)
    if paths is not None:
        return paths
    scenes(split, 0, seed)
    return _write(out_dir, params, replace=False)
