"""`lcm-exp-bench`: training-step throughput and peak memory of our LCD step against the reference step
structure (diffusers' `train_lcm_distill_sd_wds.py`), same teacher, batch, resolution and device.

The reference, as the script runs it: the VAE, the tokenizer and the text encoder every step, two separate
teacher forward passes, teacher and target in fp32 (autocast does the casting), torch's default AdamW, a
per-parameter EMA loop, diffusers' default SDPA attention. Ours: `Trainer.step` with its speed switches:
latents and text embeddings precomputed (data=cached), one batched teacher pass, teacher and target held in
the mixed-precision dtype, a fused/foreach AdamW, a foreach EMA, and on a CPU the small-head attention
kernel (`trainer.attention=auto`). Both draw the same random numbers in the same order
from the same generator, so from equal weights they compute the same loss (tests/test_bench.py checks it).
Timed steps are interleaved after warm-up.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .attention import release_buffers
from .bench_reference import Reference, _activate
from .lcd import LCD
from .executors import Overlapped, Sequential, use_threads

log = logging.getLogger(__name__)
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _unique_bytes(tensors) -> int:
    return _bytes({t.data_ptr(): t for t in tensors}.values())


def _cpu_rest() -> int | None:
    """Linux, CPU: hands freed heap (and the attention kernel's reusable buffers, so that a step's peak counts
    them) back to the OS and resets the peak-RSS mark; returns the resting RSS."""
    if not sys.platform.startswith("linux"):
        return None
    gc.collect()  # (graphs freed here give their buffers back, so release them after)
    release_buffers()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc; without it freed heap still counts as resident at rest
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return _proc_status("VmRSS")
    except OSError:
        return None


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """`Trainer.step` on precomputed latents/embeddings, with the configured speed switches (`cfg`: the bench's
    config, or a variant of it with some switches off)."""

    def __init__(self, s, cfg: DictConfig | None = None, name: str = "ours"):
        self.s, self.name = s, name
        cfg = cfg or s.cfg
        self.trainer = trainer = instantiate(cfg.trainer)() if cfg is not s.cfg else s.trainer
        teacher = copy.copy(s.teacher)  # shares the VAE/text encoder; its UNet may become a cast copy
        cast = trainer.weight_dtype != torch.float32 and instantiate(cfg.teacher, _partial_=True).keywords.get(
            "cast_to_mixed_precision", True)
        teacher.unet = copy.deepcopy(s.teacher.unet).to(trainer.weight_dtype) if cast else s.teacher.unet
        self.teacher = teacher
        self.ema = instantiate(cfg.ema)(online=s.student.unet, dtype=trainer.weight_dtype)
        optim = instantiate(cfg.optim)(params=s.student.trainable_parameters())
        lcd = LCD(student=s.student.unet, target=self.ema.target, teacher=teacher.unet, schedule=s.schedule,
                  solver=instantiate(cfg.solver), skip=s.skip, guidance=s.guidance, distance=s.distance,
                  w_embedding_dim=s.student.w_embedding_dim, sigma_data=s.student.sigma_data,
                  timestep_scaling=s.student.timestep_scaling,
                  teacher_dtype=trainer.weight_dtype if cast else torch.float32,
                  batched_cfg=trainer.batched_cfg, teacher_first=trainer.teacher_first)
        trainer.prepare(lcd, s.student, self.ema, optim.optimizer, optim.schedule(10 ** 9))
        s.active = self  # prepare put its attention processors on the shared UNets
        self.batch = {"pixels": s.pixels, "captions": s.captions}
        if cfg.bench.cached:
            with torch.no_grad():  # data=cached: what `lcm-exp-precompute` stores per sample
                posterior = s.teacher.vae.encode(s.pixels).latent_dist
                self.batch = {"latent_mean": posterior.mean, "latent_std": posterior.std, "captions": s.captions,
                              "encoder_hidden_states": s.teacher.text_encoder(s.input_ids)[0]}

    def own(self) -> list:
        """The tensors this path keeps beyond the shared networks: EMA target, optimiser state, a cast teacher."""
        own = self.ema.owned_tensors()
        own += [t for st in self.trainer.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
        return own + ([] if self.teacher.unet is self.s.teacher.unet else list(self.teacher.unet.parameters()))

    def exclusive(self, other) -> list:
        return self.own()

    def activate(self) -> None:
        """Puts its own attention processors on the UNets it shares with the other paths."""
        _activate(self, (self.s.student.unet, self.teacher.unet, self.ema.target), self.trainer.attention,
                  self.trainer.executor.threads)

    @property
    def overlap(self) -> bool:
        return isinstance(self.trainer.executor, Overlapped)

    def step(self, generator):
        """One step; with overlap_frozen the next one's teacher pass (the same batch again) runs during its
        backward, as in training, and `drain` waits for it."""
        self.activate()
        loss, _ = self.trainer.step(self.teacher, self.batch, generator, self.s.max_grad_norm,
                                    upcoming=(self.batch, generator))
        return loss

    def drain(self) -> None:
        if self.overlap:
            self.trainer.executor.drain()

    @contextlib.contextmanager
    def serial(self):
        """Steps entirely on the calling thread (a FLOP counter sees only its own thread)."""
        executor = self.trainer.executor
        executor.close()
        self.trainer.executor = Sequential(executor.lcd, executor.condition)
        try:
            yield
        finally:
            self.trainer.executor = executor


class Setup:
    """What both paths share: teacher, student, batch, device."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.trainer = instantiate(cfg.trainer)()
        self.acc = self.trainer.accelerator
        device = self.acc.device
        self.teacher = instantiate(cfg.teacher)
        for m in (self.teacher.unet, self.teacher.vae, self.teacher.text_encoder):
            m.to(device)
        self.student = instantiate(cfg.student, teacher=self.teacher)
        self.student.unet.to(device)
        make_optim = instantiate(cfg.optim)  # (the reference builds its own AdamW with the same lr)
        self.batch_size, self.lr = self.trainer.batch_size, make_optim.keywords["lr"]
        self.max_grad_norm, self.decay = make_optim.keywords["max_grad_norm"], instantiate(cfg.ema).keywords["decay"]
        self.guidance = instantiate(cfg.guidance)
        self.skip = instantiate(cfg.skip).for_teacher(self.teacher.num_train_timesteps)
        self.distance = instantiate(cfg.loss)
        self.schedule = self.teacher.schedule.to(device)
        self.alphas_cumprod, self.prediction_type = self.schedule.alphas_cumprod, self.schedule.prediction_type
        batch = next(iter(instantiate(cfg.data)(batch_size=self.batch_size)))
        self.pixels, self.captions = batch["pixels"].to(device), batch["captions"]
        self.input_ids = self.tokenize(self.captions)
        self.active = None  # the path whose attention processors the shared UNets hold
        self.threads = torch.get_num_threads()  # the reference's (and any path's without overlap_frozen)

    def shared_tensors(self) -> list:
        """What every path keeps resident: the student and the teacher's networks."""
        t = self.teacher
        return [p for m in (self.student.unet, t.unet, t.vae, t.text_encoder) for p in m.parameters()]

    def tokenize(self, captions):
        tok = self.teacher.tokenizer
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.acc.device)


# `bench.ablate`: our step with one speed switch off, timed interleaved with the others (the overrides that undo it)
ABLATIONS = {
    "overlap_frozen": ["trainer.overlap_frozen=false"],
    "batched_cfg": ["trainer.batched_cfg=false"],
    "teacher_first": ["trainer.teacher_first=false"],
    "cached": ["bench.cached=false"],
    "fused_adamw": ["optim.fused=false"],
    "attention": ["trainer.attention=sdpa"],
    "cast_frozen": ["teacher.cast_to_mixed_precision=false", "ema.cast_to_mixed_precision=false"],
}
ABLATIONS["all"] = [o for name in list(ABLATIONS) for o in ABLATIONS[name]]


def ablations(names) -> dict[str, list[str]]:
    """`bench.ablate` resolved: `each` is every switch on its own plus `all`."""
    names = list(names or [])
    if "each" in names:
        names = [n for n in names if n != "each"] + [n for n in ABLATIONS if n not in names]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"bench.ablate: unknown switch(es) {unknown}; choose from {sorted(ABLATIONS)} or each")
    return {n: ABLATIONS[n] for n in names}


def inert(name: str, cfg: DictConfig, device: torch.device, ours=None) -> str | None:
    """Why switching `name` off would change nothing here (so its ablation would time our step twice), or None.
    `ours`: our step (`Ours`), for the switches that resolve at run time."""
    if variant(cfg, ABLATIONS[name]) == cfg:
        return "it is already off: " + " ".join(ABLATIONS[name])
    if ours is not None and name == "overlap_frozen" and not ours.overlap:
        return "trainer.overlap_frozen=auto is off here (it runs on a CPU with >= 2 threads)"
    if ours is not None and name == "teacher_first" and ours.overlap:
        return "overlap_frozen runs the frozen passes on their own thread, beside the student's forward"
    if name == "cast_frozen" and cfg.trainer.mixed_precision == "no":
        return "nothing is cast in fp32 (trainer.mixed_precision=no)"
    if name == "attention" and device.type != "cpu":
        return "off a CPU, attention=auto is SDPA"
    return None


def variant(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def ablation(cfg: DictConfig, ours, overrides: list[str]) -> DictConfig:
    """Our config with one switch off and nothing else changed: the switches that resolve at run time are
    pinned to what they resolved to for `ours` (our step's path)."""
    pinned = [f"trainer.overlap_frozen={str(ours.overlap).lower()}"]
    return variant(cfg, pinned + overrides)


def count_flops(path, seed: int) -> int:
    """Model FLOPs of one step. The counter sees only its own thread, so the step runs serially here (same
    FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with path.serial() if hasattr(path, "serial") else contextlib.nullcontext(), \
            FlopCounterMode(display=False) as counter:
        path.step(torch.Generator().manual_seed(seed))
    return counter.get_total_flops()


def time_interleaved(paths, device, gen, warmup: int, rounds: int, steps_per_round: int):
    """Each path's mean step time in each round (s) and, on CUDA, peak memory (bytes): the paths take turns,
    `steps_per_round` steps each, in alternating order, after `warmup` steps each. A round is timed whole, up
    to the end of any work its steps left running (overlap_frozen's next teacher pass), so every path is
    charged for all it does and no path's work runs beside another's."""
    for _ in range(warmup):
        for p in paths:
            p.step(gen)
            p.drain()
    times = {p.name: [] for p in paths}
    peak = {p.name: 0 for p in paths}
    for r in range(rounds):
        for p in (paths if r % 2 == 0 else paths[::-1]):  # alternate the order: drift hits all alike
            p.activate()  # (outside the timed steps)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                p.step(gen)
            p.drain()
            _sync(device)
            times[p.name].append((time.perf_counter() - t0) / steps_per_round)
            if device.type == "cuda":
                others = sum(_bytes(q.exclusive(p)) for q in paths if q is not p)  # held only for the other paths
                peak[p.name] = max(peak[p.name], torch.cuda.max_memory_allocated(device) - others)
    return times, peak


def run_bench(cfg: DictConfig) -> dict:
    threads = torch.get_num_threads()
    try:
        return _run_bench(cfg)
    finally:  # (the paths set their own thread counts; a later bench in this process must find the original)
        use_threads(threads)


def _run_bench(cfg: DictConfig) -> dict:
    b = cfg.bench
    s = Setup(cfg)
    device = s.acc.device
    paths = [Reference(s), Ours(s)]
    ours = paths[1]
    for n, ov in ablations(b.ablate).items():
        if why := inert(n, cfg, device, ours):
            log.info("bench.ablate: nothing to time without %s here: %s", n, why)
            continue
        paths.append(Ours(s, ablation(cfg, ours, ov), name=f"without_{n}"))
    gen = torch.Generator().manual_seed(0)
    times, peak = time_interleaved(paths, device, gen, b.warmup, b.rounds, b.steps_per_round)
    if device.type == "cpu":  # untimed (it trims the heap): the resident tensors + how far the steps raise the RSS
        for p in paths:
            rest = _cpu_rest()
            if rest is None:
                break
            p.step(gen)
            p.drain()  # (a teacher pass it left running belongs to the step's peak)
            others = sum(_bytes(q.exclusive(p)) for q in paths if q is not p)
            resident = _unique_bytes(s.shared_tensors() + [t for q in paths for t in q.own()])
            peak[p.name] = resident - others + _proc_status("VmHWM") - rest
    flops = {p.name: count_flops(p, 1) for p in paths[:2]} if b.flops else {}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "batch_size": s.batch_size, "resolution": cfg.data.resolution,
              "mixed_precision": s.trainer.accelerator.mixed_precision,
              "steps_timed": len(times["ours"]) * b.steps_per_round,
              "ours_overlap_frozen": ours.overlap}
    for name, ts in times.items():
        med = statistics.median(ts)
        result |= {f"{name}_ms_median": 1000 * med, f"{name}_ms_min": 1000 * min(ts), f"{name}_ms_max": 1000 * max(ts),
                   f"{name}_samples_per_s": s.batch_size / med,
                   f"{name}_peak_mem_mb": peak[name] / 2 ** 20 if peak[name] else None}
        if name in flops:
            result[f"{name}_tflop_per_step"] = flops[name] / 1e12
            result[f"{name}_tflop_per_s"] = flops[name] / med / 1e12
            peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in result["device"]), None)
            if peak_flops:
                result[f"{name}_frac_of_bf16_peak"] = flops[name] / med / peak_flops
    result["speedup"] = result["ours_samples_per_s"] / result["reference_samples_per_s"]
    for p in paths[2:]:
        result[f"speedup_{p.name}"] = result[f"{p.name}_samples_per_s"] / result["reference_samples_per_s"]
    del paths, s
    gc.collect()
    return result


def report(result: dict) -> str:
    lines = [f"device {result['device']}, batch {result['batch_size']}, {result['resolution']} px, "
             f"mixed precision {result['mixed_precision']}, {result['steps_timed']} timed steps per path"]
    names = ["reference", "ours"] + [k[len("speedup_"):] for k in result if k.startswith("speedup_")]
    width = max(map(len, names))
    for name in names:
        mem = result.get(f"{name}_peak_mem_mb")
        lines.append(f"{name:>{width}}: {result[f'{name}_samples_per_s']:8.2f} samples/s  ms/step (round means) median "
                     f"{result[f'{name}_ms_median']:.1f} (min {result[f'{name}_ms_min']:.1f}, max "
                     f"{result[f'{name}_ms_max']:.1f})" + (f"  peak {mem:.0f} MB" if mem is not None else "")
                     + (f"  {result[f'{name}_tflop_per_s']:.1f} TFLOP/s" if f"{name}_tflop_per_s" in result else ""))
    lines.append(f"speedup {result['speedup']:.2f}x" + "".join(
        f", {k[len('speedup_'):]} {v:.2f}x" for k, v in result.items() if k.startswith("speedup_")))
    return "\n".join(lines + [json.dumps(result)])
