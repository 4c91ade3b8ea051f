"""Mixed precision end to end on the CPU (bf16; fp16 needs a GPU): train, validate, checkpoint, export, evaluate,
and load the export with plain diffusers, for the full and the LoRA student. The student starts from the
teacher's fp32 weights, and what is saved and exported is the fp32 EMA, not its low-precision copy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file

from jobs import TINY, lcm_exp, only_run

EVAL = ["eval.enabled=true", "eval.num_prompts=2", "eval.steps=[1,2]", "eval.reference_steps=4",
        "eval.objective=eval/student_2step/psnr_to_ref", "export.enabled=true", "tracking.validation_steps=[1,2]"]


def compose_run(tmp_path, *overrides):
    from lcm_exp.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=["teacher=tiny_random", "data.resolution=32", "trainer.cpu=true",
                                            f"teacher.cache_dir={tmp_path}", *overrides])


@pytest.fixture
def fresh_accelerate_state():
    """A process holds one accelerate state: this test's is bf16, the other tests' in this process fp32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("student", ["full", "lora"])
def test_student_starts_from_the_fp32_teacher_and_trains_in_fp32(tmp_path, student, fresh_accelerate_state):
    from diffusers import UNet2DConditionModel

    from lcm_exp.runner import build

    cfg = compose_run(tmp_path, f"student={student}", "trainer.mixed_precision=bf16",
                      *(["student.ema_target=true"] if student == "lora" else []))
    trainer = instantiate(cfg.trainer)(job_dir=str(tmp_path))
    parts = build(cfg, trainer)
    on_disk = UNet2DConditionModel.from_pretrained(parts.teacher.path, subfolder="unet").state_dict()
    assert parts.teacher.unet.dtype == torch.bfloat16 and parts.teacher.text_encoder.dtype == torch.bfloat16
    assert parts.teacher.vae.dtype == torch.float32
    trained = parts.student.trainable_parameters()
    assert trained and all(p.dtype == torch.float32 for p in trained)
    if student == "full":  # every weight of the teacher, bit for bit (the new cond_proj starts at zero)
        state = parts.student.unet.state_dict()
        assert all(torch.equal(state[k], v) for k, v in on_disk.items())
        assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if "cond_proj" in k)
    else:  # the adapters train in fp32 on the bf16 base; LoRA's B starts at zero, so the student is the teacher
        assert all("lora" in n for n, p in parts.student.unet.named_parameters() if p.requires_grad)
        assert all(torch.count_nonzero(p) == 0 for n, p in parts.student.unet.named_parameters() if "lora_B" in n)
    # the target's fp32 master is the student's fp32 weights; the copy that runs the target pass is bf16
    averaged = parts.ema.averaged()
    online = dict(parts.student.unet.named_parameters())
    assert all(torch.equal(p, online[n]) for n, p in averaged.named_parameters() if online[n].requires_grad)
    assert next(parts.ema.target.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("precision,student", [("no", "full"), ("bf16", "full"), ("no", "lora"), ("bf16", "lora")])
def test_every_precision_end_to_end(tmp_path, precision, student):
    """train (2 steps) + validation + checkpoint + export + eval, then the export loads with plain diffusers and
    samples; the exported UNet is the checkpoint's fp32 EMA master (full) / online adapters (LoRA)."""
    lcm_exp([*TINY, *EVAL, "trainer.max_steps=2", "trainer.checkpoint_every=2", f"student={student}",
             f"trainer.mixed_precision={precision}"], tmp_path)
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["trainer.mixed_precision"] == precision
    assert run.data.metrics["eval/student_2step/psnr_to_ref"] > 0
    assert "eval/teacher_ddim_2step/mse_to_ref" in run.data.metrics
    (folder,) = tmp_path.glob("outputs/*/*")
    assert (folder / "validation" / "step_000002" / "target.png").exists()
    ckpt, export = folder / "checkpoints" / "checkpoint-2", folder / "export"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    image = sample_export(export, student)
    assert image.shape == (1, 32, 32, 3) and 0 <= image.min() and image.max() <= 1 and image.std() > 0
    if student == "full":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(export, subfolder="unet")
        master = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True)["master"]
        params = list(unet.parameters())
        assert all(p.dtype == torch.float32 for p in params) and len(params) == len(master)
        assert all(torch.equal(p, m) for p, m in zip(params, master))
        # the text encoder exported as loaded (fp32), not the bf16 copy training ran
        from transformers import CLIPTextModel

        teacher_path = json.loads((export / "lcm_exp_export.json").read_text())["base_model"]
        exported = CLIPTextModel.from_pretrained(export, subfolder="text_encoder").state_dict()
        original = CLIPTextModel.from_pretrained(teacher_path, subfolder="text_encoder").state_dict()
        assert all(torch.equal(exported[k], v) for k, v in original.items())
    else:
        lora = load_file(export / "pytorch_lora_weights.safetensors")
        online = load_file(ckpt / "model.safetensors")
        assert lora and all(v.dtype == torch.float32 for v in lora.values())
        for key, value in lora.items():  # unet.<module>.lora_A.weight -> <module>.lora_A.default.weight
            name = key.removeprefix("unet.").replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            assert torch.equal(online[name], value), key


def sample_export(export: Path, student: str):
    """One 2-step image from the export, loaded the way its lcm_exp_export.json says."""
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline

    info = json.loads((export / "lcm_exp_export.json").read_text())
    if student == "full":
        pipe = DiffusionPipeline.from_pretrained(export)
        kw = {"guidance_scale": 4.0}
    else:
        pipe = StableDiffusionPipeline.from_pretrained(info["base_model"], safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
        pipe.load_lora_weights(export)
        kw = {"guidance_scale": 1.0}
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.slow
def test_embedded_default_in_bf16(tmp_path):
    """`lcm-exp trainer.mixed_precision=bf16` on the shipped teacher (fewer steps and prompts here)."""
    lcm_exp(["trainer.mixed_precision=bf16", "trainer.max_steps=10", "trainer.progress_bar=false",
             "eval.num_prompts=4", "eval.steps=[1,4]", "eval.reference_steps=8"], tmp_path)
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert 0 <= run.data.metrics["eval/student_4step/adherence"] <= 1
    (export,) = tmp_path.glob("outputs/*/*/export")
    image = sample_export(export, "full")
    assert image.shape == (1, 32, 32, 3) and image.std() > 0
