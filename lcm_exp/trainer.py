"""The training loop around the LCD step: accelerate (devices, precision, accumulation, processes), logging,
checkpoints, exact resume and preemption. `conf/trainer/` builds it.

Every micro-step draws from its own generator, seeded from (trainer.seed, micro-step, rank), and the data stream
records where it is (`lcm_exp.data.stream`): a run resumed from a checkpoint takes the same batches and the same
draws as the run that wrote it, so it logs the same losses and ends with the same weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast_object_list, set_seed

from . import checkpoint as ckpt
from . import executors
from .attention import set_attention
from .config import ATTENTION_MODES, ConfigError, invalid
from .ema import EMA
from .lcd import LCD
from .data.stream import DataPosition
from .preemption import Preempted, SignalGuard, under_submitit
from .progress import Window, logs_above, progress_bar

log = logging.getLogger(__name__)
for _name in ("accelerate.accelerator", "accelerate.checkpointing", "accelerate.utils.fsdp_utils"):  # (a line per file
    # of every checkpoint)
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass
class Trainer:
    """`conf/trainer/default.yaml` holds every value (its comments say what each does)."""

    max_steps: int
    batch_size: int
    seed: int
    mixed_precision: str
    gradient_accumulation_steps: int
    strategy: str
    cpu: bool
    log_every: int
    progress_bar: bool | str
    validation_every: int
    checkpoint_every: int
    checkpoint_every_minutes: float
    checkpoints_total_limit: int | None
    resume: str | None
    output_dir: str
    batched_cfg: bool
    teacher_first: bool
    channels_last: bool
    attention: str
    gradient_checkpointing: bool
    compile: bool
    overlap_frozen: bool | str
    job_dir: str = "."  # (at run time) the job's folder, which a relative `output_dir` is in

    def __post_init__(self):
        self._check()
        set_seed(self.seed)  # model initialisations (LoRA, from-scratch CT) and any unseeded draw
        ranks_from_submitit()
        # (several processes on a machine without CUDA: accelerate's CPU ranks, over gloo, only when asked for)
        cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        plugin = fsdp_plugin() if self.strategy == "fsdp" else None
        self.accelerator = acc = Accelerator(mixed_precision=self.mixed_precision, cpu=self.cpu or cpu_ranks,
                                             gradient_accumulation_steps=self.gradient_accumulation_steps,
                                             fsdp_plugin=plugin)
        if plugin and acc.distributed_type == DistributedType.MULTI_CPU:
            use_fsdp_on_cpu_ranks(acc, plugin)
        self.sharded = acc.distributed_type == DistributedType.FSDP  # (one process: nothing to shard)
        if self.batch_size % acc.num_processes:
            raise invalid("trainer.batch_size", self.batch_size, f"a multiple of the {acc.num_processes} processes: it "
                          "is the global batch, split evenly over them")
        if self.compile and acc.device.type == "cpu":
            raise ConfigError(
                "trainer.compile=true on a CPU is refused: torch's Inductor CPU backend (torch 2.13) computes wrong "
                "gradients for the diffusers UNet here (84 of the tiny UNet's 208 parameters get zero; eager and "
                "aot_eager agree with float64; docs/performance.md). Use trainer.compile=false on a CPU; on a GPU "
                "tests/test_gpu.py checks the compiled step against eager.")
        self.rows = (acc.process_index, acc.num_processes)  # this rank's rows of every global batch: rank::ranks
        if acc.num_processes > 1:  # one run folder: rank 0's (each rank's Hydra may have read another second)
            self.job_dir = broadcast_object_list([str(self.job_dir)])[0]
        self.output_dir = Path(self.job_dir) / self.output_dir
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.global_step = 0
        self.at_boundary = True  # between two optimiser steps: the state a checkpoint may hold
        self.saved_step: int | None = None  # the step of the newest checkpoint written or loaded
        self.window = Window()
        self.data_position = DataPosition()
        self.last_stats: dict = {}  # the last logged means (a run resumed at its last step returns them)
        self.executor = None
        self.fsdp_units: list = []  # (FSDP: the units whose gathered weights each optimiser step frees)

    def _check(self) -> None:
        checks = [
            (self.max_steps >= 0, "max_steps", self.max_steps, ">= 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", self.gradient_accumulation_steps,
             ">= 1"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", self.mixed_precision,
             "one of no, fp16, bf16"),
            (self.strategy in ("ddp", "fsdp"), "strategy", self.strategy, "ddp or fsdp"),
            (self.log_every >= 1, "log_every", self.log_every, ">= 1"),
            (self.progress_bar in (True, False, "auto"), "progress_bar", self.progress_bar, "auto, true or false"),
            (self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0 (0: none by step count)"),
            (self.checkpoint_every_minutes >= 0, "checkpoint_every_minutes", self.checkpoint_every_minutes,
             ">= 0 (0: none by time)"),
            (self.resume in (None, "latest") or "/" in str(self.resume) or ckpt.PREFIX in str(self.resume),
             "resume", self.resume, "null, latest, or the path of a checkpoint-<step> folder or a run folder"),
            (self.attention in ATTENTION_MODES, "attention", self.attention, "one of " + ", ".join(ATTENTION_MODES)),
            (self.overlap_frozen in (True, False, "auto"), "overlap_frozen", self.overlap_frozen, "auto, true or false"),
        ]
        for ok, key, value, expected in checks:
            if not ok:
                raise invalid(f"trainer.{key}", value, expected)

    @property
    def rank_batch_size(self) -> int:
        """The samples each process takes per micro-step (`batch_size` is the global batch)."""
        return self.batch_size // self.accelerator.num_processes

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    def unwrap(self, module):
        return self.accelerator.unwrap_model(module)

    def networks(self, student, ema) -> tuple:
        """(online student, target) as plain fp32 networks on rank 0, for validation, saving, the export and the
        evaluation; (None, None) on the other ranks. Under FSDP their weights are gathered from every rank (a
        collective: every rank calls this)."""
        if self.sharded:
            return self.plain(student.unet), self.plain(ema.target)
        if not self.accelerator.is_main_process:
            return None, None
        return self.unwrap(student.unet), ema.averaged()

    def plain(self, module):
        """A sharded network's full weights (gathered from every rank) in an unsharded copy on rank 0."""
        from torch.distributed.fsdp import FSDPModule

        state = self.accelerator.get_state_dict(module)  # (full, on rank 0)
        if not self.accelerator.is_main_process:
            return None
        cls = next(c for c in type(module).__mro__ if issubclass(c, torch.nn.Module) and not issubclass(c, FSDPModule))
        net = cls.from_config(module.config)
        net.load_state_dict(state)
        return net.to(self.accelerator.device).train(module.training)

    # ------------------------------------------------------------------------------------------------- set-up
    def prepare(self, lcd: LCD, student, ema: EMA, optimizer, lr_scheduler) -> None:
        """Hands the trained parts to accelerate, applies the speed switches and picks the step executor."""
        acc = self.accelerator
        for unet in (student.unet, lcd.teacher, ema.target):
            if isinstance(unet, torch.nn.Module):  # (LCM-LoRA's teacher is the student with adapters off)
                if self.channels_last:
                    unet.to(memory_format=torch.channels_last)
                set_attention(unet, self.attention)
        if self.gradient_checkpointing:
            student.unet.enable_gradient_checkpointing()
        if getattr(student, "skips_parameters", False):  # (stochastic depth: a dropped block's parameters get no gradient that step)
            acc.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        if self.sharded:
            refuse_fsdp_for(student)
        lcd.rows = self.rows
        self.unet, self.optimizer, self.lr_scheduler = acc.prepare(student.unet, optimizer, lr_scheduler)
        if self.sharded and isinstance(ema, EMA):
            ema.shard(acc.prepare, self.unet)  # (the target: sharded like the student, checkpointed with it)
            lcd.target = ema.target
        self.fsdp_units = fsdp_units(self.unet, ema.target) if self.sharded else []
        acc.register_for_checkpointing(ema)
        lcd.student = torch.compile(self.unet) if self.compile else self.unet
        if self.compile:
            lcd.teacher, lcd.target = torch.compile(lcd.teacher), torch.compile(lcd.target)
        self.lcd, self.ema, self.teacher = lcd, ema, None
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.executor = executors.build(self.overlap_frozen, lcd, student.unet, self.condition, acc.device,
                                        self.compile, acc.autocast, self.sharded)

    def resume_from(self, candidates: list[Path]) -> dict:
        """Loads the first of `candidates` whose every file reads (each one that does not is named in a warning
        and nothing of it is loaded); returns its state."""
        acc = self.accelerator
        for path in candidates:
            why = ckpt.unreadable(path)
            if why:
                log.warning("checkpoint %s cannot be used (%s): trying the one before", path, why)
                continue
            acc.load_state(str(path))  # (every file read above: a failure here is a bug to see, not to skip)
            state = ckpt.read_state(path)
            if int(state.get("world_size", acc.num_processes)) != acc.num_processes:
                log.warning("checkpoint %s was written by %s processes, this run has %d: it cannot resume exactly "
                            "(the data streams and draws are split differently)", path, state.get("world_size"),
                            acc.num_processes)
            self.global_step = self.saved_step = int(state["step"])
            rank = ckpt.rank_state(path, self.accelerator.process_index) or {}
            self.window = Window(**rank.get("window", {}))
            self.data_position = DataPosition(**rank.get("position", {}))
            state["path"], state["data"] = str(path), rank.get("data")
            self.last_stats = state.get("last_stats", {})
            log.info("resumed from %s at step %d", path, self.global_step)
            return state
        if candidates:
            log.warning("no checkpoint could be loaded; starting from step 0")
        return {}

    # ---------------------------------------------------------------------------------------------------- step
    def generator(self, micro_step: int) -> torch.Generator:
        """The generator of one micro-step's draws (VAE posterior, n, ε, ω) for the global batch: a function of the
        seed and the micro-step only, the same on every rank, so a resumed run draws what the uninterrupted one did
        and N ranks draw what one process would (each keeps its rows)."""
        key = f"{self.seed}/{micro_step}/0".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))

    def condition(self, batch: dict, generator: torch.Generator):
        latents, cond, uncond = self.teacher.condition(batch, generator, self.accelerator.device, self.rows)
        return latents.contiguous(memory_format=self.memory_format), cond, uncond

    def step(self, teacher, batch: dict, generator: torch.Generator, max_grad_norm: float, upcoming=None):
        """One micro-step: the LCD loss, backward, and (when gradients sync) clip + optimiser + lr step + EMA.
        `upcoming`: (batch, generator) of the next micro-step, which an overlapping executor prepares ahead."""
        acc, self.teacher = self.accelerator, teacher
        executors.use_threads(self.executor.threads)
        with acc.accumulate(self.unet), acc.autocast():
            loss = self.executor.loss(batch, generator, upcoming)
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(self.unet.parameters(), max_grad_norm) if acc.sync_gradients else None
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            self.ema.update()  # θ⁻ ← μθ⁻ + (1 − μ)θ after each optimiser step (Alg. 1)
            for unit in self.fsdp_units:  # (FSDP: the next forward gathers the weights just changed)
                unit.reshard()
        return loss.detach(), grad_norm

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self, teacher, data, tracker, max_grad_norm: float, guard: SignalGuard | None = None,
            on_validate=None, on_log=None, state: dict | None = None) -> dict:
        """Optimiser steps until `max_steps`, from `global_step`. `state`: what every checkpoint records beside
        the weights (config key, MLflow run id). A preemption signal (`guard`) checkpoints at the next step
        boundary and raises `Preempted`."""
        acc, accum = self.accelerator, self.gradient_accumulation_steps
        batches, total = iter(data), self.max_steps * accum
        micro = self.global_step * accum

        def fetch(i):  # the batch and generator of micro-step i (None past the last)
            return (next(batches), self.generator(i)) if i < total else None

        stats, last_save = dict(self.last_stats), time.monotonic()
        bar = progress_bar(self.progress_bar and acc.is_main_process, self.global_step, self.max_steps)
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with guard.deferred() if guard else contextlib.nullcontext(), logs_above(bar):
            try:
                upcoming = fetch(micro) if self.global_step < self.max_steps else None
                while self.global_step < self.max_steps:
                    for _ in range(accum):
                        current, micro = upcoming, micro + 1
                        upcoming = fetch(micro)
                        self.at_boundary = False
                        loss, grad_norm = self.step(teacher, *current, max_grad_norm, upcoming)
                        self.window.add(loss.float().item(), len(current[0]["captions"]),
                                        current[0].get("n_skipped", 0))
                        self.data_position.advance(current[0].get("data_state"))
                    self.global_step += 1
                    self.at_boundary = True
                    last = self.global_step == self.max_steps
                    if self.global_step % self.log_every == 0 or last:
                        stats = self._log(tracker, grad_norm, on_log)
                    if bar:
                        bar.update(1)
                        bar.set_postfix(loss=f"{self.window.last:.4g}", refresh=False)
                    if on_validate and self.validation_every and self.global_step % self.validation_every == 0:
                        self.executor.pause()
                        on_validate(self.global_step)
                    stop, due = self._agree(guard is not None and guard.requested is not None,
                                            bool(self.checkpoint_every_minutes)
                                            and time.monotonic() - last_save >= 60 * self.checkpoint_every_minutes)
                    if stop or due or (self.checkpoint_every and (self.global_step % self.checkpoint_every == 0
                                                                   or last)):
                        self.save_checkpoint(data, state or {})
                        last_save = time.monotonic()
                    if stop:
                        raise Preempted(guard.requested or "a signal on another rank")
            finally:  # also after an error: nothing left running (executor, loader workers), threads back
                if self.executor:
                    self.executor.close()
                if hasattr(batches, "close"):
                    batches.close()
                if bar:
                    bar.close()
        acc.wait_for_everyone()
        return stats

    def _log(self, tracker, grad_norm, on_log) -> dict:
        """The window's means over every rank, logged by rank 0."""
        acc, w = self.accelerator, self.window
        totals = torch.tensor([w.loss, w.n, w.samples, w.skipped], dtype=torch.float64)
        if acc.num_processes > 1:
            totals = acc.reduce(totals.to(acc.device), "sum").cpu()
        loss, n, samples, skipped = totals.tolist()
        dt = time.perf_counter() - w.t0
        stats = {"train/loss": loss / max(n, 1), "train/lr": self.lr_scheduler.get_last_lr()[0],
                 "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                 "train/samples_per_s": samples / dt,
                 "train/step_time_ms": 1000 * dt / max(1, w.n // self.gradient_accumulation_steps),
                 "data/skipped": skipped}
        if acc.device.type == "cuda":
            stats["train/peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        if acc.is_main_process:
            tracker.log_metrics(stats, self.global_step)
            log.info("step %d/%d loss %.5f lr %.2e", self.global_step, self.max_steps, stats["train/loss"],
                     stats["train/lr"])
        if on_log:
            on_log(self.global_step, stats)
        self.window = Window(last=stats["train/loss"])
        self.last_stats = {k: v for k, v in stats.items() if k.startswith("train/loss")}
        return stats

    def _agree(self, stop: bool, due: bool = False) -> tuple[bool, bool]:
        """(stop, due) as every rank sees them: a stop any rank asks for (a signal may reach one rank first), a
        time-based checkpoint rank 0's clock calls for. All ranks then checkpoint and stop at the same step."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return stop, due
        t = torch.tensor([float(stop), float(due and acc.is_main_process)], device=acc.device)
        stop, due = (acc.reduce(t, "sum") > 0).tolist()
        return stop, due

    # --------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, data, state: dict) -> Path | None:
        """Checkpoint of this step (`lcm_exp.checkpoint.save`): the folder, or None when the write failed (logged;
        the previous checkpoint stays as it was and training goes on)."""
        if self.executor:
            self.executor.pause()
        stream = getattr(data, "dataset", data)
        rank = {"window": self.window.state(), "position": self.data_position.state(),
                "data": stream.state(**self.data_position.state()) if hasattr(stream, "state") else None}
        state = {"step": self.global_step, "world_size": self.accelerator.num_processes,
                 "last_stats": self.last_stats, **state}
        saved = ckpt.save(self.accelerator, self.checkpoint_dir, self.global_step, rank, state,
                          self.checkpoints_total_limit, lambda failed: self._agree(failed)[0])
        if saved:
            self.saved_step = self.global_step
        return saved


def ranks_from_submitit() -> None:
    """Under submitit with several tasks (`hydra.launcher.tasks_per_node` x `nodes`), each task is one rank of
    the job: torch.distributed's variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) come from its job
    environment, as torchrun would set them (each task then takes the GPU of its local rank)."""
    if not under_submitit() or "RANK" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


# ------------------------------------------------------------------------------------------------------- FSDP
FSDP_BLOCKS = ["BasicTransformerBlock", "ResnetBlock2D"]  # the diffusers UNet blocks each sharded as one unit


def fsdp_plugin():
    """`trainer.strategy=fsdp`: accelerate's FSDP2 plugin, sharding the student's blocks (parameters, gradients,
    optimiser state) over the processes; full state dicts gathered for saving, sharded ones in checkpoints."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=FSDP_BLOCKS, reshard_after_forward=True,
                                          state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)


def use_fsdp_on_cpu_ranks(acc, plugin) -> None:
    """accelerate (1.16) turns FSDP on only for GPU-like ranks and silently wraps CPU ranks in DDP; torch's FSDP2
    runs on gloo CPU ranks, so on them lcm_exp selects accelerate's FSDP path itself (tests run it there)."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState()
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    log.info("trainer.strategy=fsdp on %d CPU processes (gloo): accelerate's FSDP2 path", acc.num_processes)


def fsdp_units(*modules) -> list:
    """The FSDP units of these networks, whose gathered (unsharded) weights are freed after each optimiser step and
    EMA update (`FSDPModule.reshard`), so that their next forward gathers the shards those just changed: FSDP2
    keeps the root's weights gathered after a forward (and, during accumulation, after a backward), which would
    otherwise run on stale copies."""
    from torch.distributed.fsdp import FSDPModule

    return list(dict.fromkeys(m for module in modules for m in module.modules() if isinstance(m, FSDPModule)))


def refuse_fsdp_for(student) -> None:
    why = None
    if student.teacher_unet is not None:
        why = "this student's teacher is the student itself with its adapters off (LCM-LoRA), which trains only small adapters"
    elif student.skips_parameters:
        why = "stochastic depth wraps the student's blocks, which FSDP shards as units"
    if why:
        raise ConfigError(f"trainer.strategy=fsdp is not supported here: {why}. Use trainer.strategy=ddp.")
