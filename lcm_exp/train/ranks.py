"""The processes of a run: the accelerator that holds them (one process, DDP or FSDP ranks; gloo CPU ranks
where there is no CUDA; submitit tasks as ranks) and the decisions every rank must take together."""
from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from . import fsdp

for _name in ("accelerate.accelerator", "accelerate.checkpointing", "accelerate.utils.fsdp_utils"):  # (a line per file
    logging.getLogger(_name).setLevel(logging.WARNING)  # of every checkpoint)


def accelerator(mixed_precision: str, cpu: bool, gradient_accumulation_steps: int, strategy: str) -> Accelerator:
    """accelerate's Accelerator for this process (devices, precision, accumulation, process group)."""
    ranks_from_submitit()
    # (several processes on a machine without CUDA: accelerate's CPU ranks, over gloo, only when asked for)
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    plugin = fsdp.plugin() if strategy == "fsdp" else None
    forget_previous_job()
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu or cpu_ranks,
                      gradient_accumulation_steps=gradient_accumulation_steps, fsdp_plugin=plugin)
    if plugin and acc.distributed_type == DistributedType.MULTI_CPU:
        fsdp.use_on_cpu_ranks(acc, plugin)
    return acc


def forget_previous_job() -> None:
    """accelerate keeps one process-wide state: a second job in the same process (a sweep in Hydra's basic
    launcher) with another `trainer.mixed_precision` or `trainer.cpu` would be refused ("AcceleratorState has
    already been initialized"). Each job starts from a fresh state; the process group (several ranks) stays."""
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
        GradientState._reset_state()


def ranks_from_submitit() -> None:
    """Under submitit with several tasks (`hydra.launcher.tasks_per_node` x `nodes`), each task is one rank of
    the job: torch.distributed's variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) come from its job
    environment, as torchrun would set them (each task then takes the GPU of its local rank)."""
    from .preemption import under_submitit

    if not under_submitit() or "RANK" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def rank0s(acc, value):
    """Rank 0's `value` on every rank (a picklable object)."""
    return broadcast_object_list([value])[0] if acc.num_processes > 1 else value


def agree(acc, stop: bool, due: bool = False) -> tuple[bool, bool]:
    """(stop, due) as every rank sees them: a stop any rank asks for (a signal may reach one rank first), a
    time-based checkpoint rank 0's clock calls for. All ranks then checkpoint and stop at the same step."""
    if acc.num_processes == 1:
        return stop, due
    t = torch.tensor([float(stop), float(due and acc.is_main_process)], device=acc.device)
    stop, due = (acc.reduce(t, "sum") > 0).tolist()
    return stop, due


def gathered(acc, sharded: bool, online, ema) -> tuple:
    """(online student, target) as plain fp32 networks on rank 0, for validation, saving, the export and the
    evaluation; (None, None) on the other ranks. Under FSDP their weights are gathered from every rank (a
    collective: every rank calls this)."""
    if sharded:
        return fsdp.gathered(acc, online), fsdp.gathered(acc, ema.target)
    if not acc.is_main_process:
        return None, None
    return acc.unwrap_model(online), ema.averaged()
