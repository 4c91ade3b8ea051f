"""Validation and evaluation grids (issue 18, item 4): samples upscaled pixel for pixel, captions around them."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lcm_exp.evaluation.grids import PAD, captioned_grid, font, steps_label, tile_box, tile_size, wrap
from lcm_exp.evaluation.validation import make_grid


def sample(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def dark(region: np.ndarray) -> int:
    return int((region.min(axis=-1) < 100).sum())


def test_step_labels_are_plain_english():
    assert [steps_label(n) for n in (1, 2, 4, 8)] == ["1 step", "2 steps", "4 steps", "8 steps"]


def test_validation_grid_upscales_each_sample_and_captions_rows_and_columns():
    prompts = ["a large red circle in the center on a white background", "a small blue square"]
    rows = [(n, [sample(10 * n + c) for c in range(2)]) for n in (1, 2, 4)]
    grid = make_grid(rows, prompts, title="target at training step 5")
    tile = tile_size(32)
    assert tile == 128
    a = np.asarray(grid)
    for r, (_, images) in enumerate(rows):
        for c, im in enumerate(images):
            box = tile_box(grid.size, 3, 2, r, c, tile)
            assert np.array_equal(a[box[1]:box[3], box[0]:box[2]], np.asarray(im.resize((tile, tile), Image.NEAREST)))
    first = tile_box(grid.size, 3, 2, 0, 0, tile)
    assert dark(a[:first[1], first[0]:]) > 100  # title and prompt captions above the tiles
    for r in range(3):  # a step-count label left of every row
        box = tile_box(grid.size, 3, 2, r, 0, tile)
        assert dark(a[box[1]:box[3], :box[0] - PAD]) > 20
    # the long prompt is wrapped to the tile's width, so the caption block is several lines high
    assert len(wrap(prompts[0], tile - 2 * PAD, font())) >= 3 and first[1] > 3 * 15


def test_large_samples_are_scaled_down_to_a_bounded_tile():
    grid = captioned_grid([[sample(0, 512), sample(1, 512)]], ["4 steps"], ["a", "b"])
    box = tile_box(grid.size, 1, 2, 0, 1, 256)
    assert box[2] - box[0] == 256 and grid.size[0] < 2 * 256 + 200


def test_eval_grid_columns_student_teacher_reference():
    from lcm_exp.evaluation.evaluator import EvalResult, image_grid

    steps, prompts = [1, 4], ["p one", "p two", "p three"]
    images = {f"{m}_{n}step": torch.rand(3, 3, 32, 32) for m in ("student", "teacher_ddim") for n in steps}
    images["reference"] = torch.rand(3, 3, 32, 32)
    grid = image_grid(EvalResult(prompts=prompts, steps=steps, images=images), reference_steps=50)
    cols = ["student_1step", "student_4step", "teacher_ddim_1step", "teacher_ddim_4step", "reference"]
    a = np.asarray(grid)
    for r in range(3):
        for c, col in enumerate(cols):
            box = tile_box(grid.size, 3, len(cols), r, c, 128)
            want = (images[col][r].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            assert np.array_equal(a[box[1]:box[3], box[0]:box[2]],
                                  np.asarray(Image.fromarray(want).resize((128, 128), Image.NEAREST)))
