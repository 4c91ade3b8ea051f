"""Every method where LCD works (issue 27): for TCD, PCM and DMD2 each, a run resumed from a checkpoint logs the
uninterrupted run's losses and ends with its weights (the auxiliary network and its optimiser included); two
ranks log one rank's losses at the same global batch, under DDP and FSDP (DMD2's fake score under FSDP is
refused, saying what to do); bf16 on an SD-2.1-shaped (v-prediction) teacher with a LoRA student and on an
SDXL-shaped teacher with a full student trains, and each export loads in plain diffusers with the method's
scheduler and samples."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from jobs import TINY, final_weights, lcm_exp, loss_history, same_weights
from test_scale_out import RTOL, losses, torchrun

pytestmark = pytest.mark.slow
METHODS = {"tcd": "TCDScheduler", "pcm": "TCDScheduler", "dmd2": "LCMScheduler"}
RUN = [*TINY, "trainer.max_steps=4", "trainer.checkpoint_every=2"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    from lcm_exp.teachers.tiny_layouts import build

    root = tmp_path_factory.mktemp("layouts")
    return {name: build(name, root / name) for name in ("sd21", "sdxl")}


@pytest.fixture(scope="module", params=sorted(METHODS))
def uninterrupted(request, tmp_path_factory):
    cwd = tmp_path_factory.mktemp(f"through-{request.param}")
    lcm_exp([*RUN, f"method={request.param}"], cwd)
    return request.param, cwd


def test_a_resume_continues_the_method_exactly(tmp_path, uninterrupted):
    method, through = uninterrupted
    lcm_exp([*RUN, f"method={method}", "trainer.max_steps=2"], tmp_path)
    if method == "dmd2":  # the fake score and its AdamW state are in the checkpoint
        (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/checkpoint-2")
        assert (ckpt / "model_1.safetensors").exists() and (ckpt / "custom_checkpoint_1.pkl").exists()
    r = lcm_exp([*RUN, f"method={method}", "trainer.resume=latest"], tmp_path)
    assert "at step 2" in r.stdout
    got, _ = loss_history(tmp_path)
    want, _ = loss_history(through)
    assert {s: v for s, v in got.items() if v != want[s]} == {} and sorted(got) == [1, 2, 3, 4]
    assert same_weights(final_weights(tmp_path), final_weights(through))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_follow_one(tmp_path, uninterrupted, strategy):
    method, through = uninterrupted
    args = [*RUN, f"method={method}", "trainer.max_steps=3", "trainer.checkpoint_every=0",
            f"trainer.strategy={strategy}"]
    if method == "dmd2" and strategy == "fsdp":  # an auxiliary network under FSDP is refused, saying what to do
        r = torchrun(args, tmp_path, expect=None)
        assert r.returncode != 0 and "use trainer.strategy=ddp" in r.stdout + r.stderr
        return
    torchrun(args, tmp_path)
    one, two = losses(through), losses(tmp_path)
    for step in (1, 2, 3):
        assert math.isclose(one[step], two[step], rel_tol=RTOL), (method, step, one[step], two[step])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("layout,student", [("sd21", "lora"), ("sdxl", "full")])
def test_bf16_on_real_layouts_and_the_export_loads_with_the_method_s_scheduler(tmp_path, layouts, method, layout,
                                                                                student):
    from diffusers import DiffusionPipeline

    lcm_exp([*TINY, f"teacher={layout}", f"teacher.pretrained={layouts[layout]}", f"student={student}",
             f"method={method}", "trainer.mixed_precision=bf16", "trainer.max_steps=2", "trainer.batch_size=2",
             "export.enabled=true"], tmp_path)
    history, run = loss_history(tmp_path)
    assert run.info.status == "FINISHED" and all(math.isfinite(v) for vs in history.values() for v in vs)
    (export,) = tmp_path.glob("outputs/*/*/export")
    info = json.loads((export / "lcm_exp_export.json").read_text())
    assert info["scheduler"] == METHODS[method] and info["method"].split(".")[-2] == method
    if student == "full":
        pipe = DiffusionPipeline.from_pretrained(export)
    else:
        import diffusers

        pipe = DiffusionPipeline.from_pretrained(layouts[layout])
        pipe.scheduler = getattr(diffusers, info["scheduler"]).from_pretrained(export, subfolder="scheduler")
        pipe.load_lora_weights(export)
    assert type(pipe.scheduler).__name__ == METHODS[method]
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if layout == "sd21" else "epsilon")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=4, height=32, width=32, output_type="np",
               guidance_scale=1.0 if student == "lora" else 4.0, generator=torch.Generator().manual_seed(0),
               **info["pipeline_arguments"]["4"]).images
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(out)).all()
