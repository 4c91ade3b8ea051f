"""Student builders: the online consistency model f_θ, initialised from the teacher.

Every builder shares one signature, `build(teacher, **student_cfg) -> Student`:
- `full`: a copy of the teacher UNet with the guidance embedding (`time_cond_proj_dim`), optionally with
  stochastic depth; its target is an EMA copy.
- `lora`: LCM-LoRA, peft adapters on the teacher UNet itself; the teacher pass runs the same UNet with the
  adapters disabled (no second UNet in memory); no w embedding, so ω acts only in the teacher's CFG.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

log = logging.getLogger(__name__)

# The LoRA target modules of diffusers' train_lcm_distill_lora_sd_wds.py / _sdxl_wds.py.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class Student:
    unet: UNet2DConditionModel  # trained
    w_embedding_dim: int  # 0: no w embedding (LCM-LoRA), timestep_cond is None
    sigma_data: float
    timestep_scaling: float
    kind: str = "full"  # full | lora
    ema_target: bool = True  # False: the target f_θ⁻ is the online student under no_grad
    teacher_unet: Callable | None = None  # what the LCD step calls as the teacher; None = teacher.unet

    def trainable_parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    def inference_unet(self, unet: torch.nn.Module) -> UNet2DConditionModel:
        """A plain diffusers UNet for pipelines: the module itself (full), or a copy with the LoRA merged."""
        if self.kind != "lora":
            return unet
        merged = copy.deepcopy(unet)
        merged.fuse_lora()
        merged.unload_lora()
        return merged.requires_grad_(False)


# ------------------------------------------------------------------------------------------------- full student
def full(teacher, time_cond_proj_dim: int = 256, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
         stochastic_depth: float = 0.0, **_) -> Student:
    """A full UNet copied from the teacher with the guidance projection added (`time_cond_proj_dim`), as
    the diffusers LCD script does: the new `cond_proj` layer starts at zero so the student starts as the teacher."""
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
    return Student(unet=unet, w_embedding_dim=time_cond_proj_dim, sigma_data=sigma_data,
                   timestep_scaling=timestep_scaling, kind="full")


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


def lora(teacher, lora_rank: int = 64, lora_alpha: int = 64, lora_dropout: float = 0.0,
         lora_target_modules: list[str] | None = None, ema_target: bool = False, sigma_data: float = 0.5,
         timestep_scaling: float = 10.0, stochastic_depth: float = 0.0, **_) -> Student:
    """LCM-LoRA (Luo et al. 2023b): peft LoRA adapters on the teacher's UNet, the only trained parameters."""
    from peft import LoraConfig

    if stochastic_depth:
        log.warning("student.stochastic_depth is for the full student; ignored for student=lora")
    unet = teacher.unet
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                target_modules=list(lora_target_modules or LORA_TARGET_MODULES)))
    for p in unet.parameters():  # the adapters train in fp32 even on a teacher cast to fp16/bf16
        if p.requires_grad:
            p.data = p.data.float()
    unet.train()
    return Student(unet=unet, w_embedding_dim=0, sigma_data=sigma_data, timestep_scaling=timestep_scaling,
                   kind="lora", ema_target=ema_target, teacher_unet=AdaptersDisabled(unet))


def lora_state_dict(unet) -> dict:
    """The adapters of a peft-adapted UNet, peft-named (`lora_A`/`lora_B`), for `save_lora_weights`, which
    `load_lora_weights` reads back exactly. (`convert_state_dict_to_diffusers` would rename the attention
    adapters to the old `lora.down`/`lora.up` names, which diffusers 0.42 then fails to load for them.)"""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)
