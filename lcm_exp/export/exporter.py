"""Export a distilled student the way diffusers users load it (safetensors only).

- `student=full`: a pipeline folder (the teacher's VAE, text encoder(s), tokenizer(s), the distilled UNet and
  the method's sampler: an `LCMScheduler` set to the training grid for LCD and CT (`original_inference_steps = T //
  k`, `timestep_scaling`), a `TCDScheduler` for TCD and PCM), which `DiffusionPipeline.from_pretrained(folder)`
  loads and samples in 1-8 steps.
- `student=lora`: `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(folder)` on the base model, and
  `scheduler/` with the method's scheduler config (`<SchedulerClass>.from_pretrained(folder, subfolder=...)`).
Both folders hold `lcm_exp_export.json` (base model, kind, k, the method, and the pipeline arguments its sampler
takes at each step count: TCD's `eta`, PCM's and DMD2's `timesteps`). `lcm-exp-export checkpoint=...` exports any
checkpoint of a run (or a finished run's folder).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
EXPORT_FILE = "lcm_exp_export.json"


STEP_COUNTS = range(1, 9)  # the step counts whose pipeline arguments an export records


def export(teacher, student, unet, out_dir: str | Path, num_steps: int, sampling, step: int | None = None,
           method: str | None = None) -> Path:
    """Writes the export of `unet` (a trained network of `student`) into `out_dir` (the student kind decides
    what that is), with `lcm_exp_export.json`; `num_steps`: the training grid's N = T // k; `sampling`: how the
    method's students sample. Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scheduler = sampling.scheduler
    load = student.export(teacher, getattr(unet, "module", unet), out, scheduler, plain=sampling.plain)
    info = {"kind": student.kind, "base_model": teacher.path, "teacher": teacher.name, "method": method,
            "skip_k": teacher.num_train_timesteps // num_steps, "original_inference_steps": num_steps,
            "timestep_scaling": scheduler.config.get("timestep_scaling"), "scheduler": type(scheduler).__name__,
            "pipeline_arguments": {str(n): sampling.kwargs(n) for n in STEP_COUNTS}, "step": step, "load": load}
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2))
    return out


class Exporter:
    """`conf/export/`: at the end of a run, the export of the trained student (`export`), logged as the MLflow
    artifact `model`, and with `register` a new version of that registered model (`lcm_exp.export.registry`)."""

    def __init__(self, enabled: bool, model: str, dir: str, register: str | None):
        if model not in ("target", "online"):
            from ..config import invalid

            raise invalid("export.model", model, "target (the EMA) or online")
        self.enabled, self.model, self.dir, self.register = enabled, model, dir, register

    def __call__(self, teacher, student, online, target, trainer, tracker, num_steps: int, sampling,
                 defaults: dict, method: str | None = None) -> Path | None:
        """`online`, `target`: the trained networks (plain, fp32); `sampling`: how the method's students sample;
        `defaults`: the registered model's defaults (`lcm_exp.export.registry.defaults`)."""
        if not self.enabled:
            return None
        from .registry import register

        net = target if self.model == "target" else online
        folder = export(teacher, student, net, trainer.output_dir / self.dir, num_steps, sampling,
                        step=trainer.global_step, method=method)
        tracker.log_artifact(folder, "model")
        log.info("exported the %s student (%s) to %s (MLflow artifact `model`)", student.kind, self.model, folder)
        print(f"lcm-exp: exported model: {folder.resolve()}", flush=True)
        register(self.register, folder, teacher, student, tracker, defaults, teacher.num_train_timesteps // num_steps)
        return folder


# ------------------------------------------------------------------------------------------------ from a checkpoint
def _run_folder(path: Path) -> Path:
    for folder in (path, *list(path.parents)[:3]):
        if (folder / ".hydra" / "config.yaml").exists():
            return folder
    raise SystemExit(f"lcm-exp-export: no .hydra/config.yaml in {path} or its parents (not an lcm-exp run folder)")


def _latest_checkpoint(run: Path) -> Path | None:
    ckpts = sorted(run.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    return ckpts[-1] if ckpts else None


def load_trained(student, ema, path: Path) -> int:
    """Loads a checkpoint's online weights (and EMA target) into `student`/`ema`, or a finished run's saved
    networks (`Student.save`). Returns the step."""
    from safetensors.torch import load_file

    if (path / "trainer_state.json").exists():  # an accelerate checkpoint
        if (path / "pytorch_model_fsdp_0").is_dir():  # trainer.strategy=fsdp: sharded student and EMA target
            load_state(student.unet, dcp_state(path / "pytorch_model_fsdp_0"), path)
            if student.ema_target and (path / "pytorch_model_fsdp_1").is_dir():
                ema.load_averaged(dcp_state(path / "pytorch_model_fsdp_1"))
        else:  # model.safetensors + custom_checkpoint_0.pkl (the EMA's fp32 master)
            load_state(student.unet, load_file(path / "model.safetensors"), path)
            ema_file = path / "custom_checkpoint_0.pkl"
            if student.ema_target and ema_file.exists():
                ema.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=True))
        return int(json.loads((path / "trainer_state.json").read_text())["step"])
    student.load(path, student.unet, ema.target)
    return json.loads((path / "lcm_exp_run.json").read_text()).get("step", 0) if (path / "lcm_exp_run.json").exists() else 0


def dcp_state(folder: Path) -> dict:
    """A sharded model folder of an FSDP checkpoint (torch.distributed.checkpoint, as accelerate writes it) as one
    full state dict, read without any process group."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), f"{tmp}/state.pt")
        state = torch.load(f"{tmp}/state.pt", map_location="cpu", weights_only=True)
    return state.get("model", state)


def load_state(net, state: dict, path: Path) -> None:
    """The checkpoint's weights into the student (every trained parameter must be there)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise SystemExit(f"lcm-exp-export: {path} does not match the run's student ({missing[:3]}, {unexpected[:3]})")


def export_checkpoint(path: str | Path, out: str | Path | None = None, model: str | None = None,
                      device: str = "cpu") -> Path:
    """`lcm-exp-export checkpoint=PATH`: rebuilds the run's teacher and student from its `.hydra/config.yaml`,
    loads the checkpoint (a `checkpoint-<step>` folder; a run folder: its latest checkpoint, else its final
    weights) and exports it. Returns the export folder."""
    from hydra.utils import instantiate

    from ..config import stored
    from ..distill.ema import OnlineTarget

    path = Path(path).expanduser().resolve()
    run = _run_folder(path)
    cfg = stored(OmegaConf.load(run / ".hydra" / "config.yaml"))
    teacher = instantiate(cfg.teacher).to(device)
    student = instantiate(cfg.student, teacher=teacher)
    if path == run and not student.saved(run):
        path = _latest_checkpoint(run) or path
    ema = instantiate(cfg.ema)(online=student.unet) if student.ema_target else OnlineTarget(student.unet)
    step = load_trained(student, ema, path)
    which = model or cfg.get("export", {}).get("model", "target")
    unet = ema.averaged() if which == "target" else student.unet
    out = Path(out) if out else (path if path.name.startswith("checkpoint-") else run) / "export"
    skip = instantiate(cfg.skip).for_teacher(teacher.num_train_timesteps)
    method = instantiate(cfg.method)
    sampling = method.sampling(teacher, skip.num_steps, student.timestep_scaling)
    folder = export(teacher, student, unet, out, skip.num_steps, sampling, step=step, method=cfg.method._target_)
    print(f"lcm-exp-export: exported step {step} ({student.kind}, {which}) to {folder.resolve()}", flush=True)
    return folder
