"""The training loop around the LCD step: accelerate (devices, precision, accumulation, processes),
logging, checkpoints and resume. `conf/trainer/` builds it."""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .attention import set_attention
from .ema import EMA
from .lcd import LCD, split_cond
from .overlap import FrozenThread, use_threads

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


@dataclass
class Trainer:
    max_steps: int = 200
    batch_size: int = 8
    seed: int = 0
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    cpu: bool = False
    log_every: int = 10
    validation_every: int = 0
    checkpoint_every: int = 0
    checkpoints_total_limit: int | None = 2
    resume: str | None = None
    output_dir: str = "."
    # speed switches (each measured by lcm-exp-bench)
    batched_cfg: bool = True  # the teacher's cond and uncond passes in one batched forward
    teacher_first: bool = True  # the no-grad teacher/target passes before the student's forward (same loss)
    channels_last: bool = False
    attention: str = "auto"  # auto | sdpa | xformers (lcm_exp/attention.py)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the student, teacher and target UNets (minutes of warm-up on a CPU)
    # CPU: the batch cut into chunks whose LCD loss and backward run at once, one thread each (same gradients)
    parallel_chunks: int | str = 1
    # the teacher's and the target's passes on a second thread, overlapping the student's (same loss); auto: on
    # a CPU with >= 2 threads
    overlap_frozen: bool | str = "auto"

    def __post_init__(self):
        set_seed(self.seed)  # model initialisations (LoRA, from-scratch CT) and any unseeded draw
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=self.cpu,
                                       gradient_accumulation_steps=self.gradient_accumulation_steps)
        self.output_dir = Path(self.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.global_step = 0

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, extra: dict) -> Path:
        acc = self.accelerator
        path = self.checkpoint_dir / f"checkpoint-{self.global_step}"
        acc.save_state(str(path))
        if acc.is_main_process:
            (path / STATE_FILE).write_text(json.dumps({"step": self.global_step, **extra}, indent=2))
            self._prune_checkpoints()
            log.info("saved checkpoint %s", path)
        return path

    def _prune_checkpoints(self) -> None:
        if not self.checkpoints_total_limit:
            return
        ckpts = sorted(self.checkpoint_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in ckpts[: max(0, len(ckpts) - self.checkpoints_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> dict:
        self.accelerator.load_state(str(path))
        state = json.loads((path / STATE_FILE).read_text())
        self.global_step = int(state["step"])
        return state

    # ------------------------------------------------------------------------------------------------------ step
    def prepare(self, lcd: LCD, student, ema: EMA, optimizer, lr_scheduler) -> None:
        """Hands the trained parts to accelerate and applies the speed switches to the networks."""
        acc = self.accelerator
        for unet in (student.unet, lcd.teacher, ema.target):
            if isinstance(unet, torch.nn.Module):  # (LCM-LoRA's teacher is the student with adapters off)
                apply_speed_switches(unet, self.channels_last, self.attention)
        if self.gradient_checkpointing:
            student.unet.enable_gradient_checkpointing()
        self.unet, self.optimizer, self.lr_scheduler = acc.prepare(student.unet, optimizer, lr_scheduler)
        acc.register_for_checkpointing(ema)
        lcd.student = torch.compile(self.unet) if self.compile else self.unet
        if self.compile:
            lcd.teacher, lcd.target = torch.compile(lcd.teacher), torch.compile(lcd.target)
        self.lcd, self.ema, self._uncond = lcd, ema, None
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.chunks = self._resolve_chunks(lcd, student)
        self._params = [p for p in self.unet.parameters() if p.requires_grad]
        self._threads = torch.get_num_threads()
        self.overlap = self._resolve_overlap(lcd, student)
        self._frozen = FrozenThread(self._threads, self.accelerator.autocast) if self.overlap else None
        if self.overlap:
            log.info("overlap_frozen: the teacher's and the target's passes run on a second thread (%d OpenMP "
                     "thread(s) there, %d for the student's)", self._frozen.worker_threads, self._frozen.threads)
        self._chunk_threads = max(1, self._threads // self.chunks)
        self._pool = ThreadPoolExecutor(self.chunks, thread_name_prefix="lcd-chunk") if self.chunks > 1 else None
        if self.chunks > 1:
            log.info("parallel_chunks: each batch runs as %d concurrent chunks of %d thread(s)", self.chunks,
                     self._chunk_threads)

    def _resolve_chunks(self, lcd: LCD, student) -> int:
        """How many concurrent chunks `parallel_chunks` gives here. Independent chunks, one OpenMP thread each,
        kept two cores busier than intra-op threads while torch's CPU attention kernel dominated the tiny
        teachers' step (1.16x -> 1.38x of the reference); with `attention=auto` the intra-op threads scale as
        well and the chunks' GIL hand-offs cost as much as they save, so the default is 1 (lcm-exp-bench
        measures both: `trainer.parallel_chunks=2 bench.ablate=[parallel_chunks]`). The chunks share the
        weights; their losses and gradients add up to the whole batch's, because every per-sample op of a UNet
        (GroupNorm, attention) is batch-independent and the loss is a mean."""
        acc, want = self.accelerator, self.parallel_chunks
        if want != "auto" and (isinstance(want, bool) or not isinstance(want, int) or want < 1):
            raise ValueError(f"trainer.parallel_chunks={want!r}: use auto or a whole number >= 1")
        cannot = []  # where concurrent chunks would be wrong
        if acc.num_processes > 1:
            cannot.append(f"{acc.num_processes} processes run this job (DDP's gradient reducer expects one "
                          "backward at a time)")
        if acc.scaler is not None:
            cannot.append("fp16 loss scaling is on")
        if not isinstance(lcd.teacher, torch.nn.Module):
            cannot.append("the teacher is the student with its adapters switched off (LCM-LoRA), one module that "
                          "two chunks would switch under each other")
        stochastic_depth, dropout = random_layers(student.unet)
        if stochastic_depth:
            cannot.append("student.stochastic_depth drops blocks for the whole batch at once")
        if dropout:
            cannot.append("the student has dropout, whose draws two chunks would take from one generator")
        if want == "auto":  # where chunks pay: a CPU with spare cores, and no compiled graphs
            fits = acc.device.type == "cpu" and not self.compile and torch.get_num_threads() >= 2
            return 2 if fits and not cannot and self.batch_size >= 2 else 1
        if want > 1 and cannot:
            raise ValueError(f"trainer.parallel_chunks={want} cannot run here: {'; '.join(cannot)}. "
                             "Use trainer.parallel_chunks=1 (or auto, which picks 1 here).")
        return want

    def _resolve_overlap(self, lcd: LCD, student) -> bool:
        """Whether `overlap_frozen` runs here (lcm_exp/overlap.py): auto turns it on on a CPU with >= 2 threads,
        where it cannot be wrong."""
        want = self.overlap_frozen
        if want not in (True, False, "auto"):
            raise ValueError(f"trainer.overlap_frozen={want!r}: use auto, true or false")
        cannot = []  # where the frozen passes may not run beside the student's
        if lcd.method != "ct" and not isinstance(lcd.teacher, torch.nn.Module):
            cannot.append("the teacher is the student with its adapters switched off (LCM-LoRA), one module whose "
                          "adapters the two threads would switch under each other")
        # (every draw of the worker's is the step generator's, except an online target's own dropout masks)
        if any(random_layers(student.unet)) and lcd.target is student.unet:
            cannot.append("the target is the online student (student.ema_target=false), whose dropout or "
                          "stochastic-depth masks two threads would draw from torch's default generator in no "
                          "fixed order")
        if self.accelerator.device.type != "cpu":
            cannot.append(f"the device is {self.accelerator.device.type}: on a GPU the passes queue on one stream "
                          "anyway (overlap_frozen is a CPU switch)")
        if self.compile:
            cannot.append("trainer.compile=true (compiled graphs are not called from two threads here)")
        if self.chunks > 1:
            cannot.append(f"trainer.parallel_chunks={self.chunks} already runs the step on {self.chunks} threads")
        if want == "auto":
            return torch.get_num_threads() >= 2 and not cannot
        if want and cannot:
            raise ValueError(f"trainer.overlap_frozen=true cannot run here: {'; '.join(cannot)}. "
                             "Use trainer.overlap_frozen=false (or auto, which turns it off here).")
        return want

    def condition(self, teacher, batch: dict, generator: torch.Generator):
        """Step 1 of Alg. 1: z = E(x)·scale and the text conditions, or read them from a precomputed batch."""
        acc = self.accelerator
        micro = batch.get("micro_conditioning")  # SDXL: per-sample original size and crop coordinates
        if "latent_mean" in batch:  # data=cached: the VAE posterior and the text embeddings, computed once
            mean, std = batch["latent_mean"].to(acc.device), batch["latent_std"].to(acc.device)
            noise = torch.randn(mean.shape, generator=generator).to(acc.device, mean.dtype)
            latents = (mean + std * noise).float() * teacher.vae.config.scaling_factor
            cond = {"encoder_hidden_states": batch["encoder_hidden_states"].to(acc.device)}
        else:
            latents = teacher.encode_images(batch["pixels"].to(acc.device), generator)
            cond = teacher.encode_prompts(batch["captions"], micro)
        n = latents.shape[0]
        stale = self._uncond is None or next(iter(self._uncond.values())).shape[0] != n
        if stale or (micro is not None and teacher.per_sample_uncond):
            self._uncond = teacher.encode_prompts([""] * n, micro)  # else once: the empty prompt never changes
        return latents.contiguous(memory_format=self.memory_format), cond, self._uncond

    def step(self, teacher, batch: dict, generator: torch.Generator, max_grad_norm: float,
             upcoming: dict | None = None):
        """One micro-step: the LCD loss, backward, and (when gradients sync) clip + optimiser + lr step.
        `upcoming`: the next micro-step's batch, whose teacher pass `overlap_frozen` runs during this backward."""
        acc = self.accelerator
        if self._frozen:
            use_threads(self._frozen.threads)
        with acc.accumulate(self.unet), acc.autocast():
            if self._frozen:
                loss = self._overlapped_loss(teacher, batch, generator, upcoming)
                acc.backward(loss)
            elif self.chunks > 1 and len(batch["captions"]) > 1:
                loss = self._chunked_loss_and_backward(*self.condition(teacher, batch, generator), generator)
            else:
                latents, cond, uncond = self.condition(teacher, batch, generator)
                loss = self.lcd.loss(latents, cond, uncond, generator)
                acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(self.unet.parameters(), max_grad_norm) if acc.sync_gradients else None
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            self.ema.update()  # θ⁻ ← μθ⁻ + (1 − μ)θ after each optimiser step (Alg. 1)
        return loss.detach(), grad_norm

    def _prepared(self, teacher, batch: dict, generator: torch.Generator):
        """What a micro-step needs before θ: z and c, the draws, and the teacher's solver step ẑ_{t_n}."""
        latents, cond, uncond = self.condition(teacher, batch, generator)
        x = self.lcd.noised(latents, generator)
        return x, cond, self.lcd.solver_step(x, cond, uncond)

    def _overlapped_loss(self, teacher, batch: dict, generator: torch.Generator, upcoming: dict | None):
        """The LCD loss with the frozen passes on the worker (lcm_exp/overlap.py): the target's beside the
        student's forward, then the next micro-step's teacher pass beside this backward."""
        lcd, frozen = self.lcd, self._frozen
        x, cond, z_prev = frozen.take(batch, generator) or self._prepared(teacher, batch, generator)
        f_target = frozen.submit(lcd.target_fn, x, z_prev, cond)
        if upcoming is not None:
            frozen.prepare_ahead(upcoming, generator, self._prepared, teacher, upcoming, generator)
        f_online = lcd.online(x, cond)
        return lcd.distance(f_online.float(), f_target.result().float())

    @property
    def step_threads(self) -> int:
        """The calling thread's OpenMP threads while a step runs (half of them with overlap_frozen)."""
        return self._frozen.threads if self._frozen else self._threads

    def drain(self) -> None:
        """Waits until no work of this trainer's runs on another thread (what it prepared ahead stays)."""
        if self._frozen:
            self._frozen.drain()

    def pause(self) -> None:
        """Between steps (validation, checkpoints, the end): drained, and the caller's threads as they were."""
        if self._frozen:
            self._frozen.pause()

    @contextlib.contextmanager
    def serial(self):
        """Steps that run entirely on the calling thread (one chunk, no overlap), e.g. for a FLOP counter, which
        sees only its own thread."""
        chunks, frozen = self.chunks, self._frozen
        if frozen:
            frozen.close()
        try:
            self.chunks, self._frozen = 1, None
            yield self
        finally:
            self.chunks, self._frozen = chunks, frozen

    def _chunked_loss_and_backward(self, latents, cond, uncond, generator):
        """The batch's loss and gradients from `self.chunks` concurrent chunks. The random draws are made for the
        whole batch first, so the chunks compute exactly the whole batch's terms; each chunk's gradients come
        back separately and are summed in chunk order, so the result does not depend on which thread ends first."""
        acc, lcd, n = self.accelerator, self.lcd, latents.shape[0]
        k = min(self.chunks, n)
        sizes = [n // k + (i < n % k) for i in range(k)]
        draws = lcd.draw(latents, generator).split(sizes)

        def work(part):
            lat, c, u, d = part
            torch.set_num_threads(self._chunk_threads)
            with acc.autocast():
                loss = lcd.loss(lat, c, u, draw=d) * (lat.shape[0] / n)  # its share of the batch mean
            grads = torch.autograd.grad(loss / acc.gradient_accumulation_steps, self._params, allow_unused=True)
            return loss.detach(), grads

        try:
            parts = zip(latents.split(sizes), split_cond(cond, sizes), split_cond(uncond, sizes), draws)
            results = list(self._pool.map(work, parts))
        finally:
            torch.set_num_threads(self._threads)  # torch's global default, which new threads start from
        for p, grads in zip(self._params, zip(*(g for _, g in results))):
            grads = [g for g in grads if g is not None]
            if grads:
                total = functools.reduce(torch.add, grads)
                p.grad = total if p.grad is None else p.grad.add_(total)
        return functools.reduce(torch.add, [loss for loss, _ in results])

    # ------------------------------------------------------------------------------------------------------ loop
    def fit(self, lcd: LCD, teacher, student, ema: EMA, optimizer, lr_scheduler, data, tracker, max_grad_norm: float,
            on_log=None, on_validate=None, resume_from: Path | None = None, ckpt_extra: dict | None = None) -> dict:
        """Runs optimiser steps until `max_steps`; returns the last logged stats."""
        acc = self.accelerator
        self.prepare(lcd, student, ema, optimizer, lr_scheduler)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            log.info("resumed from %s at step %d", resume_from, self.global_step)
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.global_step * 7919 + acc.process_index)
        # each micro-step's batch with the next one's (None after the last), for overlap_frozen's look-ahead
        micro_steps = max(0, self.max_steps - self.global_step) * self.gradient_accumulation_steps
        batches = itertools.pairwise(itertools.chain(itertools.islice(iter(data), micro_steps), [None]))
        stats: dict = {}
        window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "samples": 0, "skipped": 0}
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            while self.global_step < self.max_steps:
                for _ in range(self.gradient_accumulation_steps):
                    batch, upcoming = next(batches)
                    loss, grad_norm = self.step(teacher, batch, generator, max_grad_norm, upcoming)
                    window["loss"] += loss.float().item()
                    window["n"] += 1
                    window["samples"] += len(batch["captions"]) * acc.num_processes
                    window["skipped"] += batch.get("n_skipped", 0)
                self.global_step += 1
                last = self.global_step == self.max_steps
                if self.global_step % self.log_every == 0 or last:
                    dt = time.perf_counter() - window["t0"]
                    stats = {"train/loss": window["loss"] / window["n"], "train/lr": self.lr_scheduler.get_last_lr()[0],
                             "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                             "train/samples_per_s": window["samples"] / dt,
                             "train/step_time_ms": 1000 * dt / max(1, window["n"] // self.gradient_accumulation_steps),
                             "data/skipped": window["skipped"]}
                    if acc.device.type == "cuda":
                        stats["train/peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
                    if acc.is_main_process:
                        tracker.log_metrics(stats, self.global_step)
                        log.info("step %d/%d loss %.5f lr %.2e", self.global_step, self.max_steps, stats["train/loss"],
                                 stats["train/lr"])
                    if on_log:
                        on_log(self.global_step, stats)
                    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "samples": 0, "skipped": 0}
                if on_validate and self.validation_every and self.global_step % self.validation_every == 0:
                    self.pause()
                    on_validate(self.global_step)
                if self.checkpoint_every and (self.global_step % self.checkpoint_every == 0 or last):
                    self.pause()
                    self.save_checkpoint(ckpt_extra or {})
        finally:  # (the last micro-step prepares nothing ahead) also after an error: nothing running, threads back
            if self._frozen:
                self._frozen.close()
        acc.wait_for_everyone()
        return stats

    def unwrap(self, module):
        return self.accelerator.unwrap_model(module)


def apply_speed_switches(unet, channels_last: bool, attention: str) -> None:
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    set_attention(unet, attention)


def random_layers(unet) -> tuple[bool, bool]:
    """Whether `unet` draws stochastic-depth masks, and whether it draws dropout masks (torch's default generator)."""
    modules = list(unet.modules())
    return (any(getattr(m, "drop_prob", 0) > 0 for m in modules),
            any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in modules))
