"""The training loop around the method's step: accelerate (devices, precision, accumulation, processes),
logging, checkpoints, exact resume and preemption. `conf/trainer/` builds it.

Every sample of every micro-step draws from its own generator (`lcm_exp.distill.draws`) and the data stream
records where each of its lanes is (`lcm_exp.data.stream`): a run resumed from a checkpoint, on any number of
ranks, takes the same samples and the same draws as the run that wrote it, so it logs the same losses and ends
with the same weights. The lr schedule counts optimiser steps, whatever the number of ranks.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

from ..config import invalid
from ..data.stream import DataPosition
from ..distill.draws import Draws
from ..distill.ema import EMA
from . import checkpoint as ckpt
from . import fsdp, ranks, switches
from .preemption import Preempted, SignalGuard
from .optim import load_lr_schedule
from .auxiliary import AuxiliaryNetworks
from .progress import Window, logs_above, progress_bar, report

log = logging.getLogger(__name__)


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
    resume_mismatch: str
    output_dir: str
    batched_cfg: bool
    teacher_first: bool
    channels_last: bool
    attention: str
    gradient_checkpointing: bool
    compile: bool
    job_dir: str = "."  # (at run time) the job's folder, which a relative `output_dir` is in

    def __post_init__(self):
        self._check()
        set_seed(self.seed)  # model initialisations (LoRA, from-scratch CT) and any unseeded draw
        self.accelerator = acc = ranks.accelerator(self.mixed_precision, self.cpu, self.gradient_accumulation_steps,
                                                   self.strategy)
        self.sharded = acc.distributed_type == DistributedType.FSDP  # (one process: nothing to shard)
        if self.batch_size % acc.num_processes:
            raise invalid("trainer.batch_size", self.batch_size, f"a multiple of the {acc.num_processes} processes: it "
                          "is the global batch, split evenly over them")
        switches.refuse_compile_on_cpu(self.compile, acc.device)
        self.rows = range(acc.process_index, self.batch_size, acc.num_processes)  # this rank's rows: rank::ranks
        self.job_dir = ranks.rank0s(acc, str(self.job_dir))  # one run folder: rank 0's (each rank's Hydra may have
        self.output_dir = Path(self.job_dir) / self.output_dir  # read another second)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.global_step = 0
        self.at_boundary = True  # between two optimiser steps: the state a checkpoint may hold
        self.prepared = False  # the trained parts handed to accelerate (a checkpoint can hold them)
        self.saved_step: int | None = None  # the step of the newest checkpoint written or loaded
        self.window = Window()
        self.data_position = DataPosition()
        self.last_stats: dict = {}  # the last logged means (a run resumed at its last step returns them)
        self.fsdp_units: list = []  # (FSDP: the units whose gathered weights each optimiser step frees)

    def _check(self) -> None:
        choices = {"mixed_precision": ("no", "fp16", "bf16"), "strategy": ("ddp", "fsdp"),
                   "progress_bar": ("auto", True, False), "resume_mismatch": ("stop", "continue"),
                   "attention": switches.ATTENTION_MODES}
        checks = [(getattr(self, k) in v, k, "one of " + ", ".join(map(str, v))) for k, v in choices.items()] + [
            (self.max_steps >= 0, "max_steps", ">= 0"), (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", ">= 1"),
            (self.log_every >= 1, "log_every", ">= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every", ">= 0 (0: none by step count)"),
            (self.checkpoint_every_minutes >= 0, "checkpoint_every_minutes", ">= 0 (0: none by time)"),
            (self.resume in (None, "latest") or "/" in str(self.resume) or ckpt.PREFIX in str(self.resume),
             "resume", "null, latest, or the path of a checkpoint-<step> folder or a run folder")]
        for ok, key, expected in checks:
            if not ok:
                raise invalid(f"trainer.{key}", getattr(self, key), expected)

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
        """(online student, target) as plain fp32 networks on rank 0, (None, None) elsewhere (`ranks.gathered`)."""
        return ranks.gathered(self.accelerator, self.sharded, student.unet, ema)

    # ------------------------------------------------------------------------------------------------- set-up
    def prepare(self, step, student, ema, optimizer, lr_scheduler, auxiliary: dict | None = None) -> None:
        """Hands the trained parts (the method's `auxiliary` networks too) to accelerate; the speed switches."""
        acc = self.accelerator
        switches.apply(self, student, [step.teacher, ema.target])
        if getattr(student, "skips_parameters", False):  # (stochastic depth: a dropped block's parameters get no
            acc.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)  # gradient that step)
        if self.sharded:
            fsdp.refuse(student)
        self.unet, self.optimizer = acc.prepare(student.unet, optimizer)
        self.lr_scheduler = lr_scheduler  # (stepped once per optimiser step here: accelerate's steps it once per rank)
        if self.sharded and isinstance(ema, EMA):
            ema.shard(acc.prepare, self.unet)  # (the target: sharded like the student, checkpointed with it)
            step.target = ema.target
        self.fsdp_units = fsdp.units(self.unet, ema.target) if self.sharded else []
        acc.register_for_checkpointing(ema)
        aux = AuxiliaryNetworks(acc, auxiliary or {}, self.sharded)  # (after the EMA: its checkpoint files follow)
        step.auxiliary, step.update, self.auxiliary_optimizers = aux.modules, aux.update, list(aux.optimizers.values())
        step.student, step.teacher, step.target = (switches.compiled(m, self.compile) for m in (
            self.unet, step.teacher, step.target))
        self.distill, self.ema, self.prepared = step, ema, True
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

    def resume_from(self, candidates: list[Path]) -> dict:
        """Loads the first usable checkpoint of `candidates` (`checkpoint.load`); returns its state."""
        state, rank = ckpt.load(self.accelerator, candidates, lambda failed: ranks.agree(self.accelerator, failed)[0])
        if state:
            self.global_step = self.saved_step = int(state["step"])
            self.window = Window(**rank.get("window", {}))
            self.data_position = DataPosition.of(state.get("data"), self.global_step, self.samples_per_step)
            self.last_stats = state.get("last_stats", {})
            load_lr_schedule(self.lr_scheduler, state)
        return state

    @property
    def samples_per_step(self) -> int:
        """The global samples one optimiser step takes."""
        return self.batch_size * self.gradient_accumulation_steps

    def step(self, teacher, batch: dict, draws: Draws, max_grad_norm: float):
        """One micro-step: the loss (step 1 of Alg. 1, z = E(x) and c, then the LCD step), backward, and (when
        gradients sync) clip + optimiser + lr step + EMA."""
        acc = self.accelerator
        with acc.accumulate(self.unet), acc.autocast():
            latents, cond, uncond = teacher.condition(batch, draws, acc.device)
            loss = self.distill.loss(latents.contiguous(memory_format=self.memory_format), cond, uncond, draws)
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(self.unet.parameters(), max_grad_norm) if acc.sync_gradients else None
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            if not acc.optimizer_step_was_skipped:  # (fp16: a step the grad scaler skipped moves no lr either)
                self.lr_scheduler.step()
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
        batches, micro = iter(data), self.global_step * accum
        stats, last_save = dict(self.last_stats), time.monotonic()
        bar = progress_bar(self.progress_bar, acc.is_main_process, self.global_step, self.max_steps)
        waiting = guard.interruptible() if guard and acc.num_processes == 1 else contextlib.nullcontext()
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with guard.deferred() if guard else contextlib.nullcontext(), logs_above(bar):
            try:
                while self.global_step < self.max_steps:
                    with waiting:  # (one process waiting for data: a signal stops the run at this boundary)
                        group = [next(batches) for _ in range(accum)]
                    self.at_boundary = False
                    for batch in group:
                        micro += 1
                        loss, grad_norm = self.step(teacher, batch, Draws(self.seed, micro - 1, self.rows),
                                                    max_grad_norm)
                        self.window.add(loss.float().item(), batch)
                    self.data_position.advance(group, self.samples_per_step)
                    self.global_step += 1
                    self.at_boundary = True
                    last = self.global_step == self.max_steps
                    if self.global_step % self.log_every == 0 or last:
                        stats = self._log(tracker, grad_norm, on_log)
                    if bar:
                        bar.update(1)
                        bar.set_postfix(loss=f"{self.window.last:.4g}", refresh=False)
                    if on_validate and self.validation_every and self.global_step % self.validation_every == 0:
                        on_validate(self.global_step)
                    minutes = self.checkpoint_every_minutes
                    stop, due = ranks.agree(acc, guard is not None and guard.requested is not None,
                                            bool(minutes) and time.monotonic() - last_save >= 60 * minutes)
                    if stop or due or (self.checkpoint_every and (self.global_step % self.checkpoint_every == 0
                                                                   or last)):
                        self.save_checkpoint(data, state or {})
                        last_save = time.monotonic()
                    if stop:
                        raise Preempted(guard.requested or "a signal on another rank")
            finally:  # also after an error: the loader workers end now
                if hasattr(batches, "close"):
                    batches.close()
                if bar:
                    bar.close()
        acc.wait_for_everyone()
        return stats

    def _log(self, tracker, grad_norm, on_log) -> dict:
        """The window's means over every rank, logged by rank 0 (`progress.report`); a new window."""
        stats = report(self.window, self.accelerator, tracker, self.global_step, self.max_steps,
                       self.lr_scheduler.get_last_lr()[0], grad_norm, self.gradient_accumulation_steps, on_log)
        self.window = Window(last=stats["train/loss"], read_mb=self.window.read_mb)
        self.last_stats = {k: v for k, v in stats.items() if k.startswith("train/loss")}
        return stats

    # --------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, data, state: dict) -> Path | None:
        """Checkpoint of this step (`lcm_exp.train.checkpoint.save`): the folder, or None when the write failed
        (logged; the previous checkpoint stays as it was and training goes on)."""
        stream = getattr(data, "dataset", data)
        position = self.data_position
        rank = {"window": self.window.state(),
                "data": stream.state(position.consumed, position.lanes) if hasattr(stream, "state") else None}
        state = {"step": self.global_step, "world_size": self.accelerator.num_processes,
                 "last_stats": self.last_stats, "lr_schedule": self.lr_scheduler.state_dict(), **state}
        saved = ckpt.save(self.accelerator, self.checkpoint_dir, self.global_step, rank, state,
                          self.checkpoints_total_limit, lambda failed: ranks.agree(self.accelerator, failed)[0])
        if saved:
            self.saved_step = self.global_step
        return saved

