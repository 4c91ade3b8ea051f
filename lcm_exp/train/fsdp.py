"""`trainer.strategy=fsdp`: accelerate's FSDP2 plugin shards the full student, its gradients, AdamW state and
the EMA target over the processes. What lcm_exp adds around it: FSDP on gloo CPU ranks (accelerate only turns
it on for GPU-like ranks), the units whose gathered weights every optimiser step frees, the students FSDP
cannot shard, and the full network gathered on rank 0 for validation, saving, export and evaluation."""
from __future__ import annotations

import logging

import torch
from accelerate.utils import DistributedType

from ..config import ConfigError

log = logging.getLogger(__name__)
BLOCKS = ["BasicTransformerBlock", "ResnetBlock2D"]  # the diffusers UNet blocks each sharded as one unit


def plugin():
    """FSDP2, sharding the student's blocks; full state dicts gathered for saving, sharded ones in checkpoints."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=BLOCKS, reshard_after_forward=True,
                                          state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)


def use_on_cpu_ranks(acc, fsdp_plugin) -> None:
    """accelerate (1.16) turns FSDP on only for GPU-like ranks and silently wraps CPU ranks in DDP; torch's FSDP2
    runs on gloo CPU ranks, so on them lcm_exp selects accelerate's FSDP path itself (tests run it there)."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState()
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = fsdp_plugin
    if acc.mixed_precision != "no":
        fsdp_plugin.set_mixed_precision(acc.mixed_precision)
    log.info("trainer.strategy=fsdp on %d CPU processes (gloo): accelerate's FSDP2 path", acc.num_processes)


def units(*modules) -> list:
    """The FSDP units of these networks, whose gathered (unsharded) weights are freed after each optimiser step and
    EMA update (`FSDPModule.reshard`), so that their next forward gathers the shards those just changed: FSDP2
    keeps the root's weights gathered after a forward (and, during accumulation, after a backward), which would
    otherwise run on stale copies."""
    from torch.distributed.fsdp import FSDPModule

    return list(dict.fromkeys(m for module in modules for m in module.modules() if isinstance(m, FSDPModule)))


def refuse(student) -> None:
    """The students FSDP cannot shard, named before anything is wrapped."""
    why = None
    if student.teacher_unet is not None:
        why = ("this student's teacher is the student itself with its adapters off (LCM-LoRA), which trains only "
               "small adapters")
    elif student.skips_parameters:
        why = "stochastic depth wraps the student's blocks, which FSDP shards as units"
    if why:
        raise ConfigError(f"trainer.strategy=fsdp is not supported here: {why}. Use trainer.strategy=ddp.")


def gathered(acc, module):
    """A sharded network's full weights (gathered from every rank: a collective) in an unsharded fp32 copy on
    rank 0; None on the other ranks."""
    from torch.distributed.fsdp import FSDPModule

    state = acc.get_state_dict(module)  # (full, on rank 0)
    if not acc.is_main_process:
        return None
    cls = next(c for c in type(module).__mro__ if issubclass(c, torch.nn.Module) and not issubclass(c, FSDPModule))
    net = cls.from_config(module.config)
    net.load_state_dict(state)
    return net.to(acc.device).train(module.training)
