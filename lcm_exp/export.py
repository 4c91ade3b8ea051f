"""Export a distilled student the way diffusers users load it (safetensors only).

- `student=full`: a pipeline folder (the teacher's VAE, text encoder(s), tokenizer(s), the distilled UNet and
  an `LCMScheduler` set to the training grid: `original_inference_steps = T // k`, `timestep_scaling`), which
  `DiffusionPipeline.from_pretrained(folder)` loads and samples in 1-8 steps.
- `student=lora`: `pytorch_lora_weights.safetensors` (LCM-LoRA) for `pipe.load_lora_weights(folder)` on the base
  model, and `scheduler/` with the LCMScheduler config for `LCMScheduler.from_pretrained(folder, subfolder=...)`.
Both folders hold `lcm_exp_export.json` (base model, kind, k). `lcm-exp-export checkpoint=...` exports any
checkpoint of a run (or a finished run's folder).
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
EXPORT_FILE = "lcm_exp_export.json"


def lcm_scheduler(teacher, k: int, timestep_scaling: float):
    """The teacher's noise schedule as an LCMScheduler on the training skip-step grid."""
    from diffusers import LCMScheduler

    # clip_sample=False: LCM's own setting (clipping latents to [-1, 1] is wrong; a DDPM config read from SD 1.5's
    # PNDM config would carry DDPM's default True). Keys LCMScheduler does not take (DDPM's variance_type) are
    # left out, so that loading the saved scheduler does not warn about them.
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in teacher.scheduler.config.items() if k in accepted}
    return LCMScheduler.from_config(config, original_inference_steps=teacher.num_train_timesteps // k,
                                    timestep_scaling=timestep_scaling, clip_sample=False)


def pipeline(teacher, unet, scheduler):
    """A diffusers pipeline around `unet` with the teacher's other components in fp32 (as loaded, not the copies
    training cast to bf16/fp16): LatentConsistencyModelPipeline (SD 1/2), StableDiffusionXLPipeline (SDXL, which
    feeds the w embedding itself when the UNet has time_cond_proj_dim)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionXLPipeline

    vae = teacher.vae  # (never cast: fp32)
    if getattr(teacher, "text_encoder_2", None) is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=teacher.fp32("text_encoder"),
                                         text_encoder_2=teacher.fp32("text_encoder_2"), tokenizer=teacher.tokenizer,
                                         tokenizer_2=teacher.tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt)
    return LatentConsistencyModelPipeline(vae=vae, text_encoder=teacher.fp32("text_encoder"),
                                          tokenizer=teacher.tokenizer, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def lora_pipeline_class(teacher):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if getattr(teacher, "text_encoder_2", None) is not None else StableDiffusionPipeline


def export(teacher, student, unet, out_dir: str | Path, k: int, timestep_scaling: float | None = None,
           step: int | None = None) -> Path:
    """Writes the export of `unet` (a trained network of `student`) into `out_dir`; returns it."""
    from .students import lora_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scheduler = lcm_scheduler(teacher, k, timestep_scaling if timestep_scaling is not None else student.timestep_scaling)
    unet = getattr(unet, "module", unet)  # DDP-wrapped
    info = {"kind": student.kind, "base_model": teacher.path, "teacher": teacher.name, "skip_k": int(k),
            "original_inference_steps": scheduler.config.original_inference_steps,
            "timestep_scaling": scheduler.config.timestep_scaling, "step": step}
    if student.kind == "lora":
        cls = lora_pipeline_class(teacher)
        cls.save_lora_weights(out, unet_lora_layers=lora_state_dict(unet), safe_serialization=True)
        scheduler.save_pretrained(out / "scheduler")
        info["load"] = (f"pipe = {cls.__name__}.from_pretrained(base_model); pipe.scheduler = "
                        "LCMScheduler.from_pretrained(folder, subfolder='scheduler'); pipe.load_lora_weights(folder)")
    else:
        plain = unet if unet.dtype == torch.float32 else copy.deepcopy(unet).float()
        pipeline(teacher, plain, scheduler).save_pretrained(out, safe_serialization=True)
        info["load"] = "pipe = DiffusionPipeline.from_pretrained(folder)"
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2))
    return out


# ------------------------------------------------------------------------------------------------ from a checkpoint
def _run_folder(path: Path) -> Path:
    for folder in (path, *list(path.parents)[:3]):
        if (folder / ".hydra" / "config.yaml").exists():
            return folder
    raise SystemExit(f"lcm-exp-export: no .hydra/config.yaml in {path} or its parents (not an lcm-exp run folder)")


def _latest_checkpoint(run: Path) -> Path | None:
    ckpts = sorted(run.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    return ckpts[-1] if ckpts else None


def load_trained(cfg: DictConfig, teacher, student, ema, path: Path) -> int:
    """Loads a checkpoint's online weights (and EMA target) into `student`/`ema`, or a finished run's saved
    `student_unet/`+`target_unet/` (full) / `student_lora/`+`target_lora/` (LoRA). Returns the step."""
    from safetensors.torch import load_file

    if (path / "trainer_state.json").exists():  # an accelerate checkpoint: model.safetensors + custom_checkpoint_0.pkl
        state = load_file(path / "model.safetensors")
        missing, unexpected = student.unet.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if student.kind != "lora" or "lora" in m]:
            raise SystemExit(f"lcm-exp-export: {path} does not match the run's student ({missing[:3]}, {unexpected[:3]})")
        ema_file = path / "custom_checkpoint_0.pkl"
        if student.ema_target and ema_file.exists():
            ema.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=True))
        return int(json.loads((path / "trainer_state.json").read_text())["step"])
    step = json.loads((path / "lcm_exp_run.json").read_text()).get("step", 0) if (path / "lcm_exp_run.json").exists() else 0
    if student.kind == "lora":
        from peft import set_peft_model_state_dict

        for sub, net in (("student_lora", student.unet), ("target_lora", ema.target)):
            f = path / sub / "pytorch_lora_weights.safetensors"
            if f.exists():
                set_peft_model_state_dict(net, {k.removeprefix("unet."): v for k, v in load_file(f).items()})
        return step
    from diffusers import UNet2DConditionModel

    for sub, net in (("student_unet", student.unet), ("target_unet", ema.target)):
        if (path / sub).is_dir():
            net.load_state_dict(UNet2DConditionModel.from_pretrained(path / sub).state_dict())
    return step


def export_checkpoint(path: str | Path, out: str | Path | None = None, model: str | None = None,
                      device: str = "cpu") -> Path:
    """`lcm-exp-export checkpoint=PATH`: rebuilds the run's teacher and student from its `.hydra/config.yaml`,
    loads the checkpoint (a `checkpoint-<step>` folder; a run folder: its latest checkpoint, else its final
    weights) and exports it. Returns the export folder."""
    from hydra.utils import instantiate

    from .ema import OnlineTarget

    path = Path(path).expanduser().resolve()
    run = _run_folder(path)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    if path == run and not (run / "student_unet").is_dir() and not (run / "student_lora").is_dir():
        path = _latest_checkpoint(run) or path
    teacher = instantiate(cfg.teacher).to(device)
    student = instantiate(cfg.student, teacher=teacher)
    ema = instantiate(cfg.ema)(online=student.unet) if student.ema_target else OnlineTarget(student.unet)
    step = load_trained(cfg, teacher, student, ema, path)
    which = model or cfg.get("export", {}).get("model", "target")
    unet = ema.target if which == "target" else student.unet
    out = Path(out) if out else (path if path.name.startswith("checkpoint-") else run) / "export"
    folder = export(teacher, student, unet, out, k=int(cfg.skip.k), step=step)
    print(f"lcm-exp-export: exported step {step} ({student.kind}, {which}) to {folder.resolve()}", flush=True)
    return folder
