"""Image grids a person can read: tiles scaled to 128-256 px (a 32 px sample is four times larger, pixel for
pixel), a caption over each column and beside each row (prompts word-wrapped), and a title. The validation
grids (`validation.py`) and the evaluation grid (`evaluation.py`) are both drawn here."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_TILE, MAX_TILE = 128, 256
PAD = 6
FONT_SIZE = 13


def tile_size(native: int) -> int:
    """Small samples scaled up to MIN_TILE, large ones down to MAX_TILE."""
    return max(MIN_TILE, min(MAX_TILE, int(native)))


def steps_label(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def wrap(text: str, width: int, fnt) -> list[str]:
    """Greedy word wrap of `text` to lines no wider than `width` pixels (a longer word stays whole)."""
    lines: list[str] = []
    for word in str(text).split():
        if lines and fnt.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def scaled(image: Image.Image, tile: int) -> Image.Image:
    """`image` as a tile×tile RGB square: nearest-neighbour for whole-number upscales (the sample's own
    pixels), else Lanczos."""
    image = image.convert("RGB")
    if image.size == (tile, tile):
        return image
    exact = tile % image.width == 0 and tile % image.height == 0
    return image.resize((tile, tile), Image.NEAREST if exact else Image.LANCZOS)


def captioned_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
                   title: str = "", tile: int | None = None, label_width: int | None = None) -> Image.Image:
    """`rows[r][c]` under `col_labels[c]`, beside `row_labels[r]`, below `title`."""
    fnt, bold = font(), font(FONT_SIZE + 2)
    tile = tile or tile_size(max(im.width for row in rows for im in row))
    line = FONT_SIZE + 4
    if label_width is None:  # short labels ("4 steps") get a narrow margin, prompts a wide one
        label_width = min(220, max(int(fnt.getlength(t)) for t in row_labels) + 2 * PAD) if row_labels else 0
    heads = [wrap(t, tile - 2 * PAD, fnt) for t in col_labels]
    rlabels = [wrap(t, label_width - 2 * PAD, fnt) for t in row_labels]
    head_h = max((len(h) for h in heads), default=0) * line + 2 * PAD
    title_h = (FONT_SIZE + 2 + 2 * PAD) if title else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + cols * (tile + PAD) + PAD,
                             title_h + head_h + len(rows) * (tile + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((PAD, PAD), title, fill="black", font=bold)
    for c, head in enumerate(heads):
        x = label_width + PAD + c * (tile + PAD)
        for i, text in enumerate(head):
            draw.text((x + (tile - fnt.getlength(text)) / 2, title_h + PAD + i * line), text, fill="black", font=fnt)
    for r, row in enumerate(rows):
        y = title_h + head_h + r * (tile + PAD)
        lines = rlabels[r] if r < len(rlabels) else []
        top = y + (tile - len(lines) * line) / 2
        for i, text in enumerate(lines):
            draw.text((PAD, top + i * line), text, fill="black", font=fnt)
        for c, image in enumerate(row):
            grid.paste(scaled(image, tile), (label_width + PAD + c * (tile + PAD), y))
    return grid


def tile_box(grid_size: tuple[int, int], n_rows: int, n_cols: int, r: int, c: int, tile: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) of tile (r, c) of a `captioned_grid`, from the grid's size (for tests and
    for cropping one sample back out)."""
    width, height = grid_size
    left = width - (n_cols - c) * (tile + PAD)
    top = height - PAD - (n_rows - r) * (tile + PAD)
    return left, top, left + tile, top + tile
