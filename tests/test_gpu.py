"""What only a CUDA GPU can check; each test skips without one (CI has none; `scripts/gpu_bench.sh` and a lent GPU
run them). The compiled step computes what the eager one does; fp16 runs end to end, for each method too (bf16
is tested on the CPU in test_precision.py and test_method_matrix.py)."""
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


@pytest.mark.parametrize("method", ["tcd", "pcm", "dmd2"])
def test_each_method_in_fp16_end_to_end_on_the_gpu(tmp_path, method):
    """fp16 (a CPU refuses it) for the methods of issue 27: the loss scaler covers DMD2's fake score too, a
    checkpoint resumes, and the export samples with the method's scheduler and pipeline arguments."""
    import json

    run = [*TINY, f"method={method}", "trainer.mixed_precision=fp16", "trainer.checkpoint_every=2",
           "export.enabled=true"]
    lcm_exp([*run, "trainer.max_steps=2"], tmp_path)
    lcm_exp([*run, "trainer.max_steps=4", "trainer.resume=latest"], tmp_path)
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses(tmp_path).values())
    from diffusers import DiffusionPipeline

    export = sorted(tmp_path.glob("outputs/*/*/export"))[-1]
    info = json.loads((export / "lcm_exp_export.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(export)).to("cuda")
    assert type(pipe.scheduler).__name__ == info["scheduler"]
    image = pipe("a red circle", num_inference_steps=4, height=32, width=32, output_type="np",
                 **info["pipeline_arguments"]["4"]).images
    assert image.shape == (1, 32, 32, 3) and math.isfinite(float(image.std()))
