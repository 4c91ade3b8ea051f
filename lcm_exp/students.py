"""Student builders: the online consistency model f_θ, initialised from the teacher.

Every builder shares one signature, `build(teacher, cfg) -> Student`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

log = logging.getLogger(__name__)


@dataclass
class Student:
    unet: UNet2DConditionModel  # trained
    w_embedding_dim: int
    sigma_data: float
    timestep_scaling: float
    kind: str = "full"

    def trainable_parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]


def full(teacher, time_cond_proj_dim: int = 256, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
         **_) -> Student:
    """A full UNet copied from the teacher with the guidance projection added (`time_cond_proj_dim`), as
    the diffusers LCD script does: the new `cond_proj` layer starts at zero so the student starts as the teacher."""
    config = {k: v for k, v in teacher.unet.config.items() if not k.startswith("_")}  # not _use_default_values
    config["time_cond_proj_dim"] = time_cond_proj_dim
    unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(teacher.unet.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    unet.train().requires_grad_(True)
    return Student(unet=unet, w_embedding_dim=time_cond_proj_dim, sigma_data=sigma_data,
                   timestep_scaling=timestep_scaling, kind="full")
