"""Evaluation: what distillation buys at 1, 2, 4 and 8 steps (the LCM paper's headline table, per run).

For a fixed, seeded set of prompts, initial noises and one w, we sample
- the student with its method's sampler (`Method.sampling`: `LCMScheduler` for LCD and CT on SD-family teachers,
  `original_inference_steps` = T // skip.k, the training grid; `TCDScheduler` for TCD and PCM; `guidance_scale` =
  w + 1) in diffusers' `LatentConsistencyModelPipeline` (or the teacher's pipeline where the sampler needs it),
- the teacher with `StableDiffusionPipeline` + each of its own samplers (`Teacher.solvers`: DDIM and DPM-Solver++)
  at the same step counts,
- the reference: the teacher's DDIM at `eval.reference_steps` from the same noise, prompt and w,
and report `eval/<model>_<n>step/<metric>` (DESIGN.md): `mse_to_ref` (latents), `psnr_to_ref` (decoded
pixels in [0, 1]), `adherence` (shapes checker), `fid`/`kid` (offline Inception, see `metrics.py`) and
`clip_score` (a local CLIP model). A metric that cannot be computed is reported once and skipped.
"""
from __future__ import annotations

import copy
import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..teachers.pipelines import pipeline_parts, student_pipeline
from . import metrics as M

log = logging.getLogger(__name__)
MODELS = ("student", "teacher_ddim", "teacher_dpmpp")
METRICS = ("mse_to_ref", "psnr_to_ref", "adherence", "fid", "kid", "clip_score")
# Which way a sweeper should optimise an objective; the fallback objective (no eval) is the final train loss.
MAXIMIZE = ("psnr", "adherence", "clip_score")


def objective_direction(name: str) -> str:
    """'maximize' for psnr_to_ref, adherence, clip_score; 'minimize' for mse_to_ref, fid, kid and train/loss."""
    return "maximize" if any(k in name for k in MAXIMIZE) else "minimize"


def metric_name(model: str, steps: int, metric: str) -> str:
    return f"eval/{model}_{steps}step/{metric}"


HEADLINE_MODELS = ("student", "teacher_ddim")


def headline_metrics(metrics: dict[str, float], objective: str, steps: Sequence[int]) -> dict[str, float]:
    """The objective's metric for the student and the teacher's DDIM at every step count, logged a second time
    as `compare/<metric>/<model>_<n>step`. MLflow's UI orders its chart sections by name: `compare/...` comes
    before `data/...`, `eval/...`, `system/...` and `train/...`, so the charts open on the LCM table's numbers."""
    family = objective.rsplit("/", 1)[-1] if objective.startswith("eval/") else "psnr_to_ref"
    out = {}
    for model in HEADLINE_MODELS:
        for n in steps:
            name = metric_name(model, n, family)
            if name in metrics:
                out[f"compare/{family}/{model}_{n}step"] = metrics[name]
    return out


@dataclass
class EvalResult:
    prompts: list[str]
    steps: list[int]
    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    latents: dict[str, torch.Tensor] = field(default_factory=dict)  # "student_4step", ..., "reference"
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # same keys, (B, 3, H, W) in [0, 1], CPU


class Evaluator:
    """Built from `conf/eval/` (`instantiate(cfg.eval)(device=...)`); `evaluate(...)` samples and measures."""

    def __init__(self, steps: list, num_prompts: int, reference_steps: int, seed: int, w: float | None,
                 objective: str, enabled: bool, prompts: list | str, batch_size: int, model: str, timestep_spacing: str,
                 psnr_cap: float, fid: bool | None, fid_weights: str | None, num_real: int, clip_model: str | None,
                 fid_steps: list | None, device: torch.device | str | None = None):
        from ..config import invalid

        checks = [(all(int(s) >= 1 for s in steps), "steps", list(steps), "step counts >= 1"),
                  (reference_steps >= 1, "reference_steps", reference_steps, ">= 1"),
                  (num_prompts >= 1, "num_prompts", num_prompts, ">= 1"),
                  (batch_size >= 1, "batch_size", batch_size, ">= 1"),
                  (model in ("target", "online"), "model", model, "target (the EMA) or online"),
                  (timestep_spacing in ("leading", "trailing", "linspace"), "timestep_spacing", timestep_spacing,
                   "one of leading, trailing, linspace"),
                  (not enabled or str(objective).startswith("eval/"), "objective", objective,
                   "a metric name eval/<model>_<n>step/<metric>, e.g. eval/student_4step/psnr_to_ref")]
        for ok, key, value, expected in checks:
            if not ok:
                raise invalid(f"eval.{key}", value, expected)
        self.steps = [int(s) for s in steps]
        self.num_prompts, self.reference_steps, self.seed, self.w = int(num_prompts), int(reference_steps), int(seed), w
        self.objective, self.enabled, self.prompts = objective, enabled, prompt_list(prompts)
        self.batch_size, self.model, self.timestep_spacing = int(batch_size), model, timestep_spacing
        self.psnr_cap, self.fid, self.fid_weights, self.num_real = float(psnr_cap), fid, fid_weights, int(num_real)
        self.clip_model = clip_model
        self.fid_steps = None if fid_steps is None else [int(s) for s in fid_steps]  # (None: every step count)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._warned: dict[str, str] = {}

    # -------------------------------------------------------------------------------------------------- warnings
    def unavailable(self, metric: str, reason: str) -> None:
        """Reports a metric that cannot be computed, once per evaluator."""
        if metric not in self._warned:
            self._warned[metric] = reason
            log.warning("eval: metric %r not computed: %s", metric, reason)

    # -------------------------------------------------------------------------------------------------- sampling
    def noise(self, teacher, n: int, height: int, width: int) -> torch.Tensor:
        f = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn((n, teacher.unet.config.in_channels, height // f, width // f), generator=g)

    def pipelines(self, teacher, student_unet, sampling):
        """{"student": its pipeline with the method's sampler (`sampling`), "teacher_<solver>": the teacher's
        pipeline with each of its own samplers (`Teacher.solvers`)}."""
        parts, teacher_cls, _ = pipeline_parts(teacher)
        spacing = dict(timestep_spacing=self.timestep_spacing, steps_offset=1)  # SD's offset; unused by trailing
        pipes = {"student": student_pipeline(teacher, student_unet, sampling.scheduler, plain=sampling.plain)}
        for solver in teacher.solvers:
            pipes[f"teacher_{solver}"] = teacher_cls(unet=teacher.unet, scheduler=teacher.solver_scheduler(solver, **spacing),
                                                     **parts)
        for p in pipes.values():
            p.set_progress_bar_config(disable=True)
        return pipes

    @torch.no_grad()
    def _sample(self, pipe, prompts: list[str], noise: torch.Tensor, steps: int, w: float, **kw) -> torch.Tensor:
        """Latents from `pipe` at `steps` steps, in batches, from `noise` (scaled by the scheduler's
        init_noise_sigma inside the pipeline, as for every diffusers pipeline)."""
        out = []
        dtype = pipe.unet.dtype
        for i in range(0, len(prompts), self.batch_size):
            chunk = slice(i, i + self.batch_size)
            g = torch.Generator().manual_seed(self.seed + 1 + i)  # the LCM sampler's re-noising between steps
            lat = pipe(prompt=prompts[chunk], latents=noise[chunk].to(self.device, dtype), num_inference_steps=steps,
                       guidance_scale=w + 1.0, output_type="latent", generator=g,
                       height=noise.shape[-2] * pipe.vae_scale_factor, width=noise.shape[-1] * pipe.vae_scale_factor,
                       **kw).images
            out.append(lat.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def sample(self, teacher, student_unet, prompts: list[str], w: float, height: int, width: int,
               sampling) -> dict[str, torch.Tensor]:
        """{"<model>_<n>step": latents, ..., "reference": latents} from the same noise, prompts and w."""
        student_unet = student_unet.to(self.device).eval()
        if student_unet.dtype != teacher.unet.dtype:
            student_unet = torch.nn.Module.to(student_unet, teacher.unet.dtype)  # (no diffusers warning)
        pipes = self.pipelines(teacher, student_unet, sampling)
        noise = self.noise(teacher, len(prompts), height, width)
        out = {"reference": self._sample(pipes["teacher_ddim"], prompts, noise, self.reference_steps, w)}
        for model, pipe in pipes.items():
            for n in self.steps:
                kw, w_n = (sampling.kwargs(n) if model == "student" else {}), w
                if model == "student" and type(pipe).__name__ == "LatentConsistencyModelPipeline":
                    kw["original_inference_steps"] = sampling.scheduler.config.original_inference_steps
                if model == "student" and student_unet.config.time_cond_proj_dim is None:
                    # w is distilled into the LoRA: guidance_scale = w + 1 = 1 (no CFG)
                    w_n = 0.0
                out[f"{model}_{n}step"] = self._sample(pipe, prompts, noise, n, w_n, **kw)
        return out

    @torch.no_grad()
    def decode(self, teacher, latents: torch.Tensor) -> torch.Tensor:
        """Latents → pixels in [0, 1] on the CPU, with the teacher's VAE, in batches."""
        out = [(teacher.decode_latents(latents[i:i + self.batch_size].to(self.device)).float().cpu() + 1) / 2
               for i in range(0, len(latents), self.batch_size)]
        return torch.cat(out).clamp(0, 1)

    # -------------------------------------------------------------------------------------------------- evaluate
    def evaluate(self, teacher, student_unet, prompts: list[str], w: float, height: int, width: int, sampling,
                 real_images: Callable[[int], torch.Tensor] | None = None, adherence: bool = False) -> EvalResult:
        """Samples every model at every step count (the student with its method's `sampling`) and computes every
        metric it can."""
        res = EvalResult(prompts=list(prompts), steps=list(self.steps))
        res.latents = self.sample(teacher, student_unet, res.prompts, w, height, width, sampling)
        res.images = {k: self.decode(teacher, v) for k, v in res.latents.items()}
        ref_lat, ref_img = res.latents["reference"], res.images["reference"]
        names = [f"{m}_{n}step" for m in MODELS for n in self.steps if f"{m}_{n}step" in res.latents]
        for name in names:
            res.metrics[f"eval/{name}/mse_to_ref"] = M.mse(res.latents[name], ref_lat)
            res.metrics[f"eval/{name}/psnr_to_ref"] = M.psnr(res.images[name], ref_img, cap=self.psnr_cap)
        if adherence:
            self._per_model(res, names, "adherence", lambda imgs: M.adherence(imgs, res.prompts))
        fid_names = [n for n in names if self.fid_steps is None or int(n.rsplit("_", 1)[1][:-4]) in self.fid_steps]
        self._inception_metrics(res, fid_names, real_images)
        if self.clip_model:
            scorer = self._guard("clip_score", lambda: M.ClipScorer(self.clip_model, self.device))
            if scorer is not None:
                self._per_model(res, names, "clip_score", lambda imgs: scorer(imgs, res.prompts))
        res.unavailable = dict(self._warned)
        return res

    def _guard(self, metric: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any failure of one metric must leave the others
            self.unavailable(metric, f"{type(e).__name__}: {e}")
            return None

    def _per_model(self, res: EvalResult, names: list[str], metric: str, fn) -> None:
        if metric in self._warned:
            return
        for name in names:
            value = self._guard(metric, lambda: fn(res.images[name]))
            if value is None:
                return
            res.metrics[f"eval/{name}/{metric}"] = float(value)

    def _inception_metrics(self, res: EvalResult, names: list[str], real_images) -> None:
        if self.fid is False:
            return
        if self.fid is None and self.device.type != "cuda":
            for m in ("fid", "kid"):
                self.unavailable(m, "skipped on the CPU by default (Inception-v3 at 299 px costs about a second per "
                                    "image here); set eval.fid=true to compute it anyway")
            return
        if real_images is None:
            for m in ("fid", "kid"):
                self.unavailable(m, "no real images of the dataset to compare with")
            return
        net = self._guard("fid", lambda: M.InceptionFeatures(self.fid_weights, self.device, self.batch_size))
        if net is None:
            self.unavailable("kid", "the Inception network for fid could not be loaded (see the fid warning)")
            return
        real = self._guard("fid", lambda: net(real_images(self.num_real)))
        if real is None:
            self.unavailable("kid", "no real features (see the fid warning)")
            return
        for name in names:
            feats = self._guard("fid", lambda: net(res.images[name]))
            if feats is None:
                self.unavailable("kid", "Inception features failed (see the fid warning)")
                return
            for metric, fn in (("fid", M.fid), ("kid", M.kid)):
                if metric not in self._warned:
                    value = self._guard(metric, lambda: fn(feats, real))
                    if value is not None:
                        res.metrics[f"eval/{name}/{metric}"] = float(value)


# ------------------------------------------------------------------------------------------------------ reports
def table_rows(res: EvalResult) -> tuple[list[str], list[list]]:
    cols = [m for m in METRICS if any(k.endswith("/" + m) for k in res.metrics)]
    rows = [[model, n] + [res.metrics.get(metric_name(model, n, m), math.nan) for m in cols]
            for model in MODELS for n in res.steps if any(k.startswith(f"eval/{model}_") for k in res.metrics)]
    return ["model", "steps", *cols], rows


def markdown_table(res: EvalResult) -> str:
    header, rows = table_rows(res)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |" for r in rows]
    if res.unavailable:
        lines += [""] + [f"- `{m}` not computed: {why}" for m, why in res.unavailable.items()]
    return "\n".join(lines) + "\n"


def image_grid(res: EvalResult, max_rows: int = 16, reference_steps: int | None = None):
    """Rows: prompts (their text beside them); columns: the student at each step count, the teacher's DDIM at
    each, the reference; each column captioned (`grids.py`)."""
    from PIL import Image

    from .grids import captioned_grid, steps_label

    cols = [f"student_{n}step" for n in res.steps] + [f"teacher_ddim_{n}step" for n in res.steps] + ["reference"]
    heads = [f"student {steps_label(n)}" for n in res.steps] + [f"teacher DDIM {steps_label(n)}" for n in res.steps]
    heads.append(f"reference (DDIM {steps_label(reference_steps)})" if reference_steps else "reference")
    n = min(max_rows, len(res.prompts))

    def image(col, i):
        return Image.fromarray((res.images[col][i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    rows = [[image(col, i) for col in cols] for i in range(n)]
    return captioned_grid(rows, res.prompts[:n], heads, title="evaluation: student vs teacher, same noise and prompt",
                          label_width=200)


def write_report(res: EvalResult, out_dir: Path, reference_steps: int | None = None) -> list[Path]:
    """eval_table.md, eval_table.csv, eval_grid.png and eval_prompts.txt in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(res)
    (out_dir / "eval_table.md").write_text(markdown_table(res))
    with open(out_dir / "eval_table.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    image_grid(res, reference_steps=reference_steps).save(out_dir / "eval_grid.png")
    (out_dir / "eval_prompts.txt").write_text("\n".join(res.prompts) + "\n")
    return [out_dir / n for n in ("eval_table.md", "eval_table.csv", "eval_grid.png", "eval_prompts.txt")]


# ---------------------------------------------------------------------------------------------------- a run
def prompt_list(prompts) -> list[str]:
    """`eval.prompts`: a list of prompts, or the path of a text file with one prompt per line (blank lines and
    `#` comments left out)."""
    if isinstance(prompts, str):
        from pathlib import Path as _Path

        path = _Path(prompts).expanduser()
        if not path.is_file():
            from ..config import invalid

            raise invalid("eval.prompts", prompts, "a list of prompts or a text file of prompts, one per line")
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [str(p) for p in (prompts or [])]


def eval_prompts(evaluator: Evaluator, source) -> list[str]:
    """`eval.prompts` when given; else the dataset's held-out prompts (data=shapes); else its first captions."""
    if evaluator.prompts:
        return list(evaluator.prompts)[: evaluator.num_prompts] if evaluator.num_prompts else list(evaluator.prompts)
    if source.prompts is not None:
        return source.prompts(evaluator.num_prompts, seed=evaluator.seed)
    log.warning("eval.prompts is empty: using the first %d captions of the dataset", evaluator.num_prompts)
    return list(next(iter(source.batches(evaluator.num_prompts)))["captions"])[: evaluator.num_prompts]


def real_images_fn(source, batch: int = 64):
    """n → the dataset's first n images in [0, 1] (B, 3, H, W), read once and kept; None without images."""
    cache: dict = {}

    def take(n: int) -> torch.Tensor:
        if cache.get("n", 0) < n:
            out, got = [], 0
            for b in source.batches(min(batch, n)):
                if "pixels" not in b:
                    raise ValueError("the dataset holds no images (data=cached of other shards)")
                out.append(b["pixels"][: n - got])
                got += len(out[-1])
                if got >= n:
                    break
            cache.update(n=n, pixels=(torch.cat(out).float().clamp(-1, 1) + 1) / 2)
        return cache["pixels"][:n]

    return take


def evaluate_run(evaluator: Evaluator, teacher, student_unet, source, tracker, out_dir: Path, step: int, w: float,
                 resolution: int, sampling) -> dict[str, float]:
    """The evaluation of one run: samples, measures, writes the table and the grid into `out_dir/eval/`,
    logs metrics and artifacts (artifact path `eval/`) to the tracker's run, returns the metrics. `source`: the
    dataset's `EvalSource`; `w`: the guidance's mid-range w unless `eval.w` is set; `sampling`: how the method's
    students sample."""
    ev = evaluator
    w = float(ev.w) if ev.w is not None else float(w)
    prompts = eval_prompts(ev, source)
    unet = copy.deepcopy(student_unet)  # eval may cast; the trained module stays as it is
    res = ev.evaluate(teacher, unet, prompts, w=w, height=resolution, width=resolution, sampling=sampling,
                      real_images=real_images_fn(source, ev.batch_size), adherence=source.adherence)
    paths = write_report(res, Path(out_dir) / "eval", reference_steps=ev.reference_steps)
    tracker.log_metrics({**headline_metrics(res.metrics, ev.objective, res.steps), **res.metrics}, step)
    for p in paths:
        tracker.log_artifact(p, "eval")
    print(markdown_table(res), flush=True)
    return res.metrics
