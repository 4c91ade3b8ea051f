"""`lcm-exp-bench`: training-step throughput and peak memory of our step against the reference step
(`reference.py`: diffusers' `train_lcm_distill_sd_wds.py`), same teacher, batch, resolution and device.

Ours is what `lcm-exp` trains with: every part built by `runner.build` from the composed config (method,
solver, loss, student, teacher, ...), prepared by the trainer with its speed switches, and stepped by
`Trainer.step`. With `bench.cached` it reads what `data=cached` stores (the VAE posterior and the text
embeddings), so it skips the encoders as training on cached shards does. `bench.ablate` adds our step again
with one switch off; `bench.methods` adds it with each other method (its cost against LCD's). The paths take turns (interleaved rounds, alternating order) after a warm-up, so drift
hits all alike; the last line printed is one JSON object.
"""
from __future__ import annotations

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

from ..runner import build
from ..distill.draws import Draws
from .reference import Reference

log = logging.getLogger(__name__)
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
# `bench.ablate`: our step with one speed switch off, timed interleaved with the others (the overrides that undo it)
ABLATIONS = {
    "batched_cfg": ["trainer.batched_cfg=false"],
    "teacher_first": ["trainer.teacher_first=false"],
    "cached": ["bench.cached=false"],
    "fused_adamw": ["optim.fused=false"],
    "cast_frozen": ["teacher.cast_to_mixed_precision=false", "ema.cast_to_mixed_precision=false"],
}
ABLATIONS["all"] = [o for name in list(ABLATIONS) for o in ABLATIONS[name]]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


class Ours:
    """Our training step as `lcm-exp` runs it, built from `cfg` (the bench's config or a variant of it)."""

    def __init__(self, cfg: DictConfig, batch: dict, name: str = "ours"):
        self.name, self.cfg = name, cfg
        self.trainer = trainer = instantiate(cfg.trainer)()
        self.parts = parts = build(cfg, trainer)
        trainer.prepare(parts.step, parts.student, parts.ema, parts.optim.optimizer, parts.scheduler,
                        parts.auxiliary)
        self.batch = batch
        if cfg.bench.cached:  # data=cached: what `lcm-exp-precompute` stores per sample
            teacher, device = parts.teacher, trainer.accelerator.device
            with torch.no_grad():
                posterior = teacher.vae.encode(batch["pixels"].to(device, teacher.vae.dtype)).latent_dist
                emb = teacher.encode_prompts(batch["captions"])["encoder_hidden_states"]
            self.batch = {"latent_mean": posterior.mean, "latent_std": posterior.std, "captions": batch["captions"],
                          "encoder_hidden_states": emb.float()}

    def own(self) -> list:
        """Every tensor this path keeps: the teacher's networks, student, target, optimiser state."""
        p = self.parts
        nets = [*p.teacher.frozen_modules(), p.student.unet, *(a.module for a in p.auxiliary.values())]
        tensors = [t for m in nets for t in m.parameters()] + list(getattr(p.ema, "owned_tensors", list)())
        optimizers = [self.trainer.optimizer, *getattr(self.trainer, "auxiliary_optimizers", [])]
        return tensors + [t for o in optimizers for st in o.state.values() for t in st.values() if torch.is_tensor(t)]

    def step(self, i: int) -> torch.Tensor:
        """Step `i`: its draws are `draws(i)`'s, as the reference's."""
        return self.trainer.step(self.parts.teacher, self.batch, draws(i, self.cfg), self.parts.optim.max_grad_norm)[0]


class ReferencePath:
    """The reference step (`reference.py`) with step `i`'s per-row generators."""

    name = "reference"

    def __init__(self, cfg: DictConfig, ours: Ours, batch: dict):
        self.cfg, self.ref = cfg, Reference(cfg, ours.parts.student.unet, batch, ours.trainer.accelerator)

    def own(self) -> list:
        return self.ref.own()

    def step(self, i: int) -> torch.Tensor:
        return self.ref.step(draws(i, self.cfg).generators)


def draws(i: int, cfg: DictConfig) -> Draws:
    """Step i's draws: a generator per row of the batch, seeded by (trainer.seed, i, row)."""
    return Draws(int(cfg.trainer.seed), i, range(int(cfg.trainer.batch_size)))


def ablations(names) -> dict[str, list[str]]:
    """`bench.ablate` resolved: `each` is every switch on its own plus `all`."""
    names = list(names or [])
    if "each" in names:
        names = [n for n in names if n != "each"] + [n for n in ABLATIONS if n not in names]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"bench.ablate: unknown switch(es) {unknown}; choose from {sorted(ABLATIONS)} or each")
    return {n: ABLATIONS[n] for n in names}


def variant(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def with_method(cfg: DictConfig, name: str) -> DictConfig:
    """`cfg` with the method group set to conf/method/`name`.yaml (as `method=name` would compose it)."""
    from ..config.options import config_dir

    path = Path(config_dir()) / "method" / f"{name}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"bench.methods: no method {name!r}; choose from {choices}")
    out = OmegaConf.merge(cfg, {})
    OmegaConf.set_struct(out, False)
    out.method = OmegaConf.load(path)
    return out


def inert(name: str, cfg: DictConfig) -> str | None:
    """Why switching `name` off would change nothing here (its ablation would time our step twice), or None."""
    if variant(cfg, ABLATIONS[name]) == cfg:
        return "it is already off: " + " ".join(ABLATIONS[name])
    if name == "cast_frozen" and cfg.trainer.mixed_precision == "no":
        return "nothing is cast in fp32 (trainer.mixed_precision=no)"
    return None


def count_flops(path, i: int) -> int:
    """Model FLOPs of one step (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        path.step(i)
    return counter.get_total_flops()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(paths, device, warmup: int, rounds: int, steps_per_round: int):
    """Each path's mean step time in each round (s) and, on CUDA, its peak memory (bytes, the other paths'
    resident tensors taken out): the paths take turns, `steps_per_round` steps each, in alternating order, after
    `warmup` steps each. Every path takes the same steps' draws."""
    for i in range(warmup):
        for p in paths:
            p.step(i)
    times, peak = {p.name: [] for p in paths}, {p.name: 0 for p in paths}
    for r in range(rounds):
        for p in (paths if r % 2 == 0 else paths[::-1]):  # alternate the order: drift hits all alike
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            for i in range(steps_per_round):
                p.step(warmup + r * steps_per_round + i)
            _sync(device)
            times[p.name].append((time.perf_counter() - t0) / steps_per_round)
            if device.type == "cuda":
                others = sum(_bytes(q.own()) for q in paths if q is not p)
                peak[p.name] = max(peak[p.name], torch.cuda.max_memory_allocated(device) - others)
    return times, peak


def cpu_peaks(paths, i: int) -> dict:
    """Linux, CPU: each path's resident tensors plus how far one of its steps raises the process's peak RSS
    above its resting RSS (freed heap trimmed and the mark reset before each)."""
    out = {}
    for p in paths:
        gc.collect()
        try:
            ctypes.CDLL(None).malloc_trim(0)  # glibc; without it freed heap still counts as resident at rest
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            rest = _proc_status("VmRSS")
        except (OSError, AttributeError):
            return {}
        p.step(i)
        out[p.name] = _bytes(p.own()) + _proc_status("VmHWM") - rest
    return out


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def run_bench(cfg: DictConfig) -> dict:
    b = cfg.bench
    batch = next(iter(instantiate(cfg.data)(batch_size=cfg.trainer.batch_size)))
    ours = Ours(cfg, batch)
    device = ours.trainer.accelerator.device
    paths = [ReferencePath(cfg, ours, batch), ours]
    for n, overrides in ablations(b.ablate).items():
        if why := inert(n, cfg):
            log.info("bench.ablate: nothing to time without %s here: %s", n, why)
            continue
        paths.append(Ours(variant(cfg, overrides), batch, name=f"without_{n}"))
    for m in b.get("methods") or []:  # each method's step, interleaved with the others: its cost against LCD's
        paths.append(Ours(with_method(cfg, m), batch, name=f"method_{m}"))
    times, peak = time_interleaved(paths, device, b.warmup, b.rounds, b.steps_per_round)
    if device.type == "cpu" and sys.platform.startswith("linux"):
        peak = cpu_peaks(paths, 0) or peak
    flops = {p.name: count_flops(p, 1) for p in paths[:2]} if b.flops else {}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "batch_size": int(cfg.trainer.batch_size), "resolution": int(cfg.data.resolution),
              "mixed_precision": ours.trainer.accelerator.mixed_precision,
              "method": OmegaConf.select(cfg, "method._target_"), "solver": OmegaConf.select(cfg, "solver._target_"),
              "steps_timed": len(times["ours"]) * b.steps_per_round}
    for name, ts in times.items():
        med = statistics.median(ts)
        result |= {f"{name}_ms_median": 1000 * med, f"{name}_ms_min": 1000 * min(ts), f"{name}_ms_max": 1000 * max(ts),
                   f"{name}_samples_per_s": result["batch_size"] / med,
                   f"{name}_peak_mem_mb": peak[name] / 2 ** 20 if peak.get(name) else None}
        if name in flops:
            result[f"{name}_tflop_per_step"] = flops[name] / 1e12
            result[f"{name}_tflop_per_s"] = flops[name] / med / 1e12
            peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in result["device"]), None)
            if peak_flops:
                result[f"{name}_frac_of_bf16_peak"] = flops[name] / med / peak_flops
    result["speedup"] = result["ours_samples_per_s"] / result["reference_samples_per_s"]
    for p in paths[2:]:
        result[f"speedup_{p.name}"] = result[f"{p.name}_samples_per_s"] / result["reference_samples_per_s"]
    del paths, ours
    gc.collect()
    return result


def report(result: dict) -> str:
    lines = [f"device {result['device']}, batch {result['batch_size']}, {result['resolution']} px, "
             f"mixed precision {result['mixed_precision']}, {result['steps_timed']} timed steps per path; ours: "
             f"{result['method']} with {result['solver']}"]
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
