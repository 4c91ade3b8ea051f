"""Deterministic prompt-adherence checker for the shapes dataset (numpy only, no learned model).

`detect(image)` reads a scene back from a square image:

1. background: each plain or two-tone layout (halves split either way) is
   scored on the image border by a trimmed mean colour distance; the best one,
   with its colours re-estimated as the border's median colours, is the
   per-pixel background;
2. foreground: pixels far (> `FOREGROUND_DISTANCE`) from the background (near a
   two-tone split: from any blend of its two colours); the largest 8-connected blob;
3. colour: the palette colour whose background -> colour blend line best fits
   the blob's core (median residual), so blurred, blended edges still read right;
4. coverage: each pixel's position along that blend line, a soft alpha that
   undoes anti-aliasing and blur (normalised by the palette colour, or by the
   image's own 95th percentile when that fits better);
5. position: grid cell of the alpha-weighted centroid;
6. shape: the shape template (drawn as `shapes.render` draws it, with the same
   area and centroid, sharp or blurred) nearest to the alpha map in L1;
7. size: the shape's extent, sqrt(area / fill ratio), against a threshold
   between the small and large size ranges.

`check(image, caption)` compares that with the caption's scene.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

from .shapes import (BACKGROUND_COLOURS, BACKGROUNDS, CENTROID_DY, COLOURS, FILL, KINDS, POSITIONS,
                     SIZE_RANGES, Scene, parse_caption, shape_alpha)

#: Colour distance (0-255 RGB, Euclidean) beyond which a pixel is foreground.
FOREGROUND_DISTANCE = 60.0
#: Extent / cell size between the small and large size ranges (geometric mean of the gap).
SIZE_THRESHOLD = math.sqrt(SIZE_RANGES["small"][1] * SIZE_RANGES["large"][0])
#: Gaussian blurs (pixels) tried on each shape template, so blurry images match too.
TEMPLATE_BLURS = (0.0, 0.7, 1.4)
ATTRIBUTES = ("shape", "colour", "position", "size", "background")
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)


def to_array(image) -> np.ndarray:
    """HxWx3 float64 RGB in [0, 255] from a PIL image, a uint8 HxWx3 array, or a
    float array / torch tensor in [-1, 1] (CHW or HWC)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if hasattr(image, "detach"):  # torch tensor, without importing torch
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
        raise ValueError(f"expected one RGB image, got shape {arr.shape}")
    if arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64)
    return (np.clip(arr.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5


@lru_cache(maxsize=16)
def _layouts(h: int, w: int) -> tuple:
    """Every background layout: (name, HxWx3 background, split-band mask or None, (c1, c2) or None)."""
    out = []
    rows, cols = np.mgrid[0:h, 0:w]
    for name, colours in BACKGROUNDS.items():
        rgb = [np.array(BACKGROUND_COLOURS[c], dtype=np.float64) for c in colours]
        if len(rgb) == 1:
            out.append((name, np.broadcast_to(rgb[0], (h, w, 3)), None, None))
            continue
        for first, second in (rgb, rgb[::-1]):
            for coord, n in ((rows, h), (cols, w)):  # top/bottom or left/right halves
                bg = np.where((coord < n // 2)[..., None], first, second)
                band = np.abs(coord + 0.5 - n / 2) < max(1.0, n / 16)
                out.append((name, bg, band, (first, second)))
    return tuple(out)


def _fit_background(img: np.ndarray):
    """The background layout that best matches the image border (trimmed mean distance, robust
    to a shape touching it), with each of its colours replaced by the border's median colour there.

    Returns (name, HxWx3 background image, split-band mask or None, (c1, c2) or None).
    """
    h, w, _ = img.shape
    b = max(1, round(h / 32))
    ring = np.ones((h, w), bool)
    ring[b:-b, b:-b] = False
    pixels = img[ring]
    keep = int(0.7 * len(pixels))
    scores = [np.sort(np.linalg.norm(pixels - bg[ring], axis=1))[:keep].mean()
              for _, bg, _, _ in _layouts(h, w)]
    name, ref, band, pair = _layouts(h, w)[int(np.argmin(scores))]
    bg, colours = ref.copy(), []
    sample = ring.copy()  # the median of a region's border is robust to a shape touching it
    if band is not None:
        sample &= ~band
    for colour in pair or (ref[0, 0],):
        where = np.all(ref == colour, axis=-1)
        if (sample & where).sum() >= 4:
            bg[where] = np.median(img[sample & where], axis=0)
        colours.append(bg[where][0])
    return name, bg, band, (tuple(colours) if pair else None)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (label propagation)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        grown = np.max([p[i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    h, w = mask.shape
    p = np.pad(mask, r)
    return np.any([p[i:i + h, j:j + w] for i in range(2 * r + 1) for j in range(2 * r + 1)], axis=0)


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n x n matrix of a 1-D Gaussian blur (sigma in pixels) with zero padding."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.exp(-0.5 * (offsets / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array; sigma in pixels."""
    if sigma <= 0:
        return a
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


def detect(image) -> Scene:
    """The scene an image shows; attributes it cannot read are None."""
    img = to_array(image)
    h, w, _ = img.shape
    if h != w:
        raise ValueError(f"expected a square image, got {h}x{w}")
    background, bg, band, pair = _fit_background(img)
    dist = np.linalg.norm(img - bg, axis=-1)
    if band is not None:  # a blurred split is a blend of the two background colours, not foreground
        c1, c2 = pair
        t = np.clip((img - c1) @ (c2 - c1) / np.dot(c2 - c1, c2 - c1), 0, 1)
        seg = np.linalg.norm(img - (c1 + t[..., None] * (c2 - c1)), axis=-1)
        dist = np.where(band, np.minimum(dist, seg), dist)
    mask = dist > FOREGROUND_DISTANCE
    if not mask.any():
        return Scene(None, None, None, None, background)
    blob = _largest_component(mask)

    # colour: the palette colour whose background->colour blend line fits the blob's core best
    core = blob & (dist >= np.median(dist[blob]))
    pix, base = img[core], bg[core]
    lines = _PALETTE[:, None, :] - base[None]
    t = np.clip(np.einsum("knc,nc->kn", lines, pix - base) / np.einsum("knc,knc->kn", lines, lines), 0, 1.5)
    residual = np.linalg.norm(pix - base - t[..., None] * lines, axis=-1)
    c = int(np.argmin(np.median(residual, axis=1)))

    # coverage: position along the background->colour line; scale 1 trusts the palette's
    # intensity (right for blur), the 95th percentile trusts the image's (right for off colours)
    direction = _PALETTE[c] - bg
    coverage = np.einsum("hwc,hwc->hw", img - bg, direction) / np.einsum("hwc,hwc->hw", direction, direction)
    region = _dilate(blob, max(1, round(h / 32)))
    peak = float(np.percentile(coverage[blob], 95))
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    best = None
    for scale in (1.0,) if abs(peak - 1) < 0.01 else (1.0, max(peak, 0.2)):
        alpha = np.where(region, np.clip(coverage / scale, 0, 1), 0.0)
        area = alpha.sum()
        if area < 0.5:
            continue
        cx, cy = (alpha * xs).sum() / area, (alpha * ys).sum() / area
        for kind in KINDS:  # shape: nearest template with the same area and centroid
            extent = math.sqrt(area / FILL[kind])
            template = shape_alpha(kind, cx, cy - CENTROID_DY[kind] * extent, extent, w)
            error = min(np.abs(alpha - _blur(template, s)).sum() for s in TEMPLATE_BLURS) / area
            if best is None or error < best[0]:
                best = (error, kind, extent, cx, cy)
    if best is None:
        return Scene(None, None, None, None, background)
    _, kind, extent, cx, cy = best
    row, col = min(2, int(cy * 3 / h)), min(2, int(cx * 3 / w))
    size = "large" if extent / (w / 3) > SIZE_THRESHOLD else "small"
    return Scene(kind, list(COLOURS)[c], size, POSITIONS[row * 3 + col], background)


def check(image, caption: str) -> dict:
    """Per-attribute adherence of `image` to `caption`: {"shape", "colour", "position",
    "size", "background", "all"} -> bool. Raises ValueError for a non-shapes caption."""
    want, got = parse_caption(caption), detect(image)
    result = {"shape": got.kind == want.kind, "colour": got.colour == want.colour,
              "position": got.position == want.position, "size": got.size == want.size,
              "background": got.background == want.background}
    result["all"] = all(result.values())
    return result


def attribute_rates(images, captions) -> dict:
    """Fraction of images passing each check (and "all"); images may be a batched tensor."""
    captions = list(captions)
    results = [check(image, text) for image, text in zip(images, captions, strict=True)]
    if not results:
        raise ValueError("no images to check")
    return {key: sum(r[key] for r in results) / len(results) for key in (*ATTRIBUTES, "all")}


def adherence_rate(images, captions) -> float:
    """Fraction of images that match their caption in every attribute."""
    return attribute_rates(images, captions)["all"]
