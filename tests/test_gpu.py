"""What only a CUDA GPU can check; each test skips without one (CI has none; `scripts/gpu_bench.sh` and a lent GPU
run them). The compiled step computes what the eager one does; fp16 runs end to end (bf16 is tested on the CPU
in test_precision.py)."""
from __future__ import annotations

import math

import pytest
import torch

from jobs import TINY, lcm_exp, loss_history

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def losses(cwd) -> dict[int, float]:
    history, run = loss_history(cwd)
    assert run.info.status == "FINISHED"
    return {step: next(iter(v)) for step, v in sorted(history.items())}


def test_compiled_step_follows_the_eager_step(tmp_path):
    """trainer.compile=true (student, teacher and target through torch.compile): the same losses as eager, to
    fp32 kernel differences."""
    args = [*TINY, "trainer.max_steps=4"]
    (tmp_path / "eager").mkdir(), (tmp_path / "compiled").mkdir()
    lcm_exp([*args, "trainer.compile=false"], tmp_path / "eager")
    lcm_exp([*args, "trainer.compile=true"], tmp_path / "compiled", timeout=1200)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
    for step in eager:
        assert math.isclose(eager[step], compiled[step], rel_tol=1e-3), (step, eager[step], compiled[step])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_end_to_end_on_the_gpu(tmp_path, precision):
    lcm_exp([*TINY, "trainer.max_steps=4", f"trainer.mixed_precision={precision}", "trainer.checkpoint_every=2",
             "export.enabled=true", "eval.enabled=true", "eval.steps=[1,2]", "eval.num_prompts=2",
             "eval.reference_steps=4", "eval.objective=eval/student_2step/psnr_to_ref"], tmp_path)
    assert all(math.isfinite(v) for v in losses(tmp_path).values())
    from diffusers import DiffusionPipeline

    (export,) = tmp_path.glob("outputs/*/*/export")
    pipe = DiffusionPipeline.from_pretrained(str(export)).to("cuda")
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and math.isfinite(float(image.std()))
