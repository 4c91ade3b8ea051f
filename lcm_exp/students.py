"""Student kinds: the online consistency model f_θ, initialised from the teacher, and everything that differs
between kinds: what trains, what the teacher pass calls, how the trained networks are saved, loaded, merged for
inference and exported.

Every builder shares one signature, `build(teacher, **student_cfg) -> Student` (`conf/student/<kind>.yaml`):
- `full`: a copy of the teacher UNet with the guidance embedding (`time_cond_proj_dim`), optionally with
  stochastic depth; its target is an EMA copy.
- `lora`: LCM-LoRA, peft adapters on the teacher UNet itself; the teacher pass runs the same UNet with the
  adapters disabled (no second UNet in memory); no w embedding, so ω acts only in the teacher's CFG.
A new kind subclasses `Student` (in any module) and names its builder as `student._target_`.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

log = logging.getLogger(__name__)

# The LoRA target modules of diffusers' train_lcm_distill_lora_sd_wds.py / _sdxl_wds.py.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


class Student:
    """A student kind: `unet` is trained (its `requires_grad` parameters), its target is an EMA copy or (no
    `ema_target`) the online network itself; `teacher_unet` is what the LCD step calls as the teacher (None: the
    teacher's own UNet)."""

    kind = "full"
    ema_target = True
    skips_parameters = False  # some parameters may get no gradient in a step (stochastic depth): DDP must look
    export_needs_base = False  # the export holds only what was trained (adapters): loading it needs the base model
    teacher_unet: Callable | None = None

    def __init__(self, unet, w_embedding_dim: int, sigma_data: float, timestep_scaling: float):
        self.unet, self.w_embedding_dim = unet, int(w_embedding_dim)  # 0: no w input (timestep_cond is None)
        self.sigma_data, self.timestep_scaling = float(sigma_data), float(timestep_scaling)

    def trainable_parameters(self) -> list:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def guidance_scale(self, w: float) -> float:
        """A diffusers pipeline's guidance_scale that samples this student at LCM guidance w."""
        return w + 1.0 if self.w_embedding_dim else 1.0

    def inference_unet(self, net: torch.nn.Module) -> UNet2DConditionModel:
        """A plain diffusers UNet of a trained network (`net`: the online student or the target)."""
        return net

    def teacher_again(self) -> None:
        """After training: make `teacher.unet` the plain teacher again (the evaluation's baselines)."""

    # --------------------------------------------------------------------------------------- saving, export
    def save(self, folder: Path, online, target) -> None:
        """The final networks in the run folder, loadable with `from_pretrained` (`load` reads them back)."""
        online.save_pretrained(Path(folder) / "student_unet")
        target.save_pretrained(Path(folder) / "target_unet")

    def load(self, folder: Path, online, target) -> None:
        for sub, net in (("student_unet", online), ("target_unet", target)):
            if (Path(folder) / sub).is_dir():
                net.load_state_dict(UNet2DConditionModel.from_pretrained(Path(folder) / sub).state_dict())

    def saved(self, folder: Path) -> bool:
        return (Path(folder) / "student_unet").is_dir()

    def export(self, teacher, net, out: Path, scheduler, plain: bool = False) -> str:
        """Writes what a diffusers user loads into `out` (`plain`: in the teacher family's own pipeline, whose
        call takes `eta` and `timesteps`); returns how to load it."""
        from .teachers.pipelines import export_pipeline

        fp32 = net if net.dtype == torch.float32 else copy.deepcopy(net).float()
        export_pipeline(teacher, fp32, scheduler, plain=plain).save_pretrained(out, safe_serialization=True)
        return "pipe = DiffusionPipeline.from_pretrained(folder)"


# ------------------------------------------------------------------------------------------------- full student
def full(teacher, time_cond_proj_dim: int, sigma_data: float, timestep_scaling: float,
         stochastic_depth: float) -> Student:
    """A full UNet copied from the teacher with the guidance projection added (`time_cond_proj_dim`), as the
    diffusers LCD script does. The new `cond_proj` layer is zeroed here (the script leaves diffusers' random
    initialisation), so the student starts exactly as the teacher."""
    config = {k: v for k, v in teacher.unet.config.items() if not k.startswith("_")}  # not _use_default_values
    config["time_cond_proj_dim"] = time_cond_proj_dim
    unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(teacher.unet.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    # trained in float32 whatever the teacher's dtype (`float()`: diffusers' `to(dtype)` warns about fp32 modules)
    unet.float().train().requires_grad_(True)
    if stochastic_depth > 0:
        n = add_stochastic_depth(unet, stochastic_depth)
        log.info("stochastic depth %.3g on %d residual / transformer blocks", stochastic_depth, n)
    student = Student(unet, time_cond_proj_dim, sigma_data, timestep_scaling)
    student.skips_parameters = stochastic_depth > 0
    return student


# ---------------------------------------------------------------------------------------------- stochastic depth
class _DropPath:
    """Mixin: in training, skip the whole block with probability `drop_prob` (output = input); never in eval."""

    drop_prob: float = 0.0

    def forward(self, hidden_states, *args, **kwargs):
        if self.training and self.drop_prob > 0 and torch.rand(()) < self.drop_prob:
            return hidden_states
        return super().forward(hidden_states, *args, **kwargs)


class DroppableResnetBlock2D(_DropPath, ResnetBlock2D):
    pass


class DroppableBasicTransformerBlock(_DropPath, BasicTransformerBlock):
    pass


def add_stochastic_depth(unet: torch.nn.Module, p: float) -> int:
    """Makes every residual block whose output may equal its input (a ResnetBlock2D keeping its channels and
    resolution, every BasicTransformerBlock) droppable with probability p. The classes are swapped in place, so
    parameter names, `save_pretrained` and `from_pretrained` are unchanged. Returns the number of blocks."""
    n = 0
    for m in unet.modules():
        if type(m) is ResnetBlock2D and m.in_channels == m.out_channels and not (m.up or m.down):
            m.__class__ = DroppableResnetBlock2D
        elif type(m) is BasicTransformerBlock:
            m.__class__ = DroppableBasicTransformerBlock
        else:
            continue
        m.drop_prob = float(p)
        n += 1
    return n


# ------------------------------------------------------------------------------------------------------ LCM-LoRA
class AdaptersDisabled:
    """The teacher of LCM-LoRA: the adapted UNet called with its adapters off (the base weights)."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


class LoraStudent(Student):
    """LCM-LoRA (Luo et al. 2023b): peft adapters on the teacher's UNet are the only trained parameters."""

    kind = "lora"
    export_needs_base = True
    WEIGHTS = "pytorch_lora_weights.safetensors"

    def __init__(self, unet, sigma_data: float, timestep_scaling: float, ema_target: bool):
        super().__init__(unet, 0, sigma_data, timestep_scaling)
        self.ema_target, self.teacher_unet = ema_target, AdaptersDisabled(unet)

    def inference_unet(self, net):
        """A copy with the LoRA merged into the base weights."""
        merged = copy.deepcopy(net)
        merged.fuse_lora()
        merged.unload_lora()
        return merged.requires_grad_(False)

    def teacher_again(self) -> None:
        self.unet.disable_adapters()

    def save(self, folder: Path, online, target) -> None:
        from diffusers import StableDiffusionPipeline  # the same LoRA file format for SD and SDXL

        nets = {"student_lora": online, **({"target_lora": target} if self.ema_target else {})}
        for sub, net in nets.items():
            StableDiffusionPipeline.save_lora_weights(Path(folder) / sub, unet_lora_layers=lora_state_dict(net))

    def load(self, folder: Path, online, target) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for sub, net in (("student_lora", online), ("target_lora", target)):
            f = Path(folder) / sub / self.WEIGHTS
            if f.exists():
                set_peft_model_state_dict(net, {k.removeprefix("unet."): v for k, v in load_file(f).items()})

    def saved(self, folder: Path) -> bool:
        return (Path(folder) / "student_lora").is_dir()

    def export(self, teacher, net, out: Path, scheduler, plain: bool = False) -> str:
        """`pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(folder)` on the base model, and
        `scheduler/` with the method's scheduler config."""
        from .teachers.pipelines import lora_pipeline_class

        cls = lora_pipeline_class(teacher)
        cls.save_lora_weights(out, unet_lora_layers=lora_state_dict(net), safe_serialization=True)
        scheduler.save_pretrained(Path(out) / "scheduler")
        return (f"pipe = {cls.__name__}.from_pretrained(base_model); pipe.scheduler = "
                f"{type(scheduler).__name__}.from_pretrained(folder, subfolder='scheduler'); "
                "pipe.load_lora_weights(folder)")


def lora(teacher, lora_rank: int, lora_alpha: int, lora_dropout: float, lora_target_modules: list[str],
         ema_target: bool, sigma_data: float, timestep_scaling: float) -> LoraStudent:
    """LCM-LoRA: adapters on the teacher's UNet, trained in fp32 (also on a teacher cast to fp16/bf16)."""
    from peft import LoraConfig

    unet = teacher.unet
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                target_modules=list(lora_target_modules or LORA_TARGET_MODULES)))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    unet.train()
    return LoraStudent(unet, sigma_data, timestep_scaling, ema_target)


def lora_state_dict(unet) -> dict:
    """The adapters of a peft-adapted UNet, peft-named (`lora_A`/`lora_B`), for `save_lora_weights`, which
    `load_lora_weights` reads back exactly. (`convert_state_dict_to_diffusers` would rename the attention
    adapters to the old `lora.down`/`lora.up` names, which diffusers 0.42 then fails to load for them.)"""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(getattr(unet, "module", unet))
