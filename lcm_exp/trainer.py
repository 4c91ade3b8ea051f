"""The training loop around the LCD step: accelerate (devices, precision, accumulation, processes),
logging, checkpoints and resume. `conf/trainer/` builds it."""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .ema import EMA
from .lcd import LCD

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

    def __post_init__(self):
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

    # ------------------------------------------------------------------------------------------------------ loop
    def fit(self, lcd: LCD, teacher, student, ema: EMA, optimizer, lr_scheduler, data, tracker, max_grad_norm: float,
            on_log=None, on_validate=None, resume_from: Path | None = None, ckpt_extra: dict | None = None) -> dict:
        """Runs optimiser steps until `max_steps`; returns the last logged stats."""
        acc = self.accelerator
        unet, optimizer, lr_scheduler = acc.prepare(student.unet, optimizer, lr_scheduler)
        acc.register_for_checkpointing(ema)
        lcd.student = unet
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            log.info("resumed from %s at step %d", resume_from, self.global_step)
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.global_step * 7919 + acc.process_index)

        uncond = None
        batches = iter(data)
        stats: dict = {}
        window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "samples": 0, "skipped": 0}
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        while self.global_step < self.max_steps:
            for _ in range(self.gradient_accumulation_steps):
                batch = next(batches)
                with acc.accumulate(unet), acc.autocast():
                    pixels = batch["pixels"].to(acc.device)
                    latents = teacher.encode_images(pixels)  # Alg. 1: z = E(x)
                    micro = batch.get("micro_conditioning")  # SDXL: per-sample original size, crop coords
                    cond = teacher.encode_prompts(batch["captions"], micro)
                    if (micro and hasattr(teacher, "time_ids")) or uncond is None or next(iter(uncond.values())).shape[0] != len(batch["captions"]):
                        uncond = teacher.encode_prompts([""] * len(batch["captions"]), micro)
                    loss = lcd.loss(latents, cond, uncond, generator)
                    acc.backward(loss)
                    grad_norm = None
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(unet.parameters(), max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                window["loss"] += loss.detach().float().item()
                window["n"] += 1
                window["samples"] += len(batch["captions"]) * acc.num_processes
                window["skipped"] += batch.get("n_skipped", 0)
            ema.update()  # θ⁻ ← μθ⁻ + (1 − μ)θ after each optimiser step (Alg. 1)
            self.global_step += 1
            last = self.global_step == self.max_steps
            if self.global_step % self.log_every == 0 or last:
                dt = time.perf_counter() - window["t0"]
                stats = {"train/loss": window["loss"] / window["n"], "train/lr": lr_scheduler.get_last_lr()[0],
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
                on_validate(self.global_step)
            if self.checkpoint_every and (self.global_step % self.checkpoint_every == 0 or last):
                self.save_checkpoint(ckpt_extra or {})
        acc.wait_for_everyone()
        return stats

    def unwrap(self, module):
        return self.accelerator.unwrap_model(module)
