"""`teacher=tiny`: the embedded default teacher, a small latent diffusion model trained by the project on
`data=shapes` (recipe: `tiny_recipe.py`), loaded through `load_teacher` like Stable Diffusion 1.5.

Where the weights come from, in order:

1. `teacher.pretrained`, when given (any folder in the StableDiffusionPipeline layout);
2. the shipped folder `lcm_exp/assets/tiny_teacher/`, when its `recipe.json` equals the configured recipe
   (`teacher.arch` / `teacher.build` over the defaults): no build on a fresh machine;
3. the cache, `teacher.cache_dir/teachers/tiny-<hash of the recipe>/`, built there on first use.

`lcm-exp-build-teacher [--out DIR] [--force] [overrides]` builds the configured recipe (progress bars),
then measures the teacher (DDIM-50 adherence on held-out prompts, per attribute, against w) and logs the
recipe, the loss curves, the adherence and an image grid to MLflow (experiment `lcm-teacher`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

from . import Teacher, load_teacher
from .tiny_random import cached_folder
from .tiny_recipe import DEFAULT_ARCH, DEFAULT_BUILD, NOT_RECIPE

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny_teacher"
RECIPE_FILE = "recipe.json"
BUILD_LOG = "build_log.json"  # timings and loss curves of the build that made the folder


def _plain(d) -> dict:
    if d is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(d, DictConfig):
            return OmegaConf.to_container(d, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(d)


def recipe(arch=None, build=None) -> dict:
    """The full recipe (architecture + training) that determines the weights, JSON-normalised."""
    b = {k: v for k, v in {**DEFAULT_BUILD, **_plain(build)}.items() if k not in NOT_RECIPE}
    return json.loads(json.dumps({"arch": {**DEFAULT_ARCH, **_plain(arch)}, "build": b}, sort_keys=True))


def shipped(spec: dict) -> Path | None:
    """The shipped folder when it holds exactly this recipe's weights."""
    try:
        ok = json.loads((ASSETS / RECIPE_FILE).read_text()) == spec and (ASSETS / "model_index.json").exists()
    except (OSError, ValueError):
        return None
    return ASSETS if ok else None


def ensure(cache_dir: str = "~/.cache/lcm_exp", arch=None, build=None, log_metric=None) -> Path:
    """The folder of the configured tiny teacher: shipped, cached, or built now into the cache."""
    spec = recipe(arch, build)
    if (path := shipped(spec)) is not None:
        return path
    path = cached_folder(cache_dir, "tiny", spec)
    if not (path / "model_index.json").exists():
        log.info("building the tiny teacher into %s (its recipe differs from the shipped one)", path)
        build_into(path, spec, cache_dir, _plain(build), log_metric)
    return path


def build_into(path: Path, spec: dict, cache_dir: str, build_extra: dict, log_metric=None) -> dict:
    from .tiny_recipe import build

    b = {**spec["build"], **{k: v for k, v in build_extra.items() if k in NOT_RECIPE}}
    threads = b.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    curve = []

    def record(key, value, step):
        curve.append([key, value, step])
        if log_metric:
            log_metric(key, value, step)

    info = build(path, spec["arch"], b, cache_dir=cache_dir, log_metric=record)
    (path / RECIPE_FILE).write_text(json.dumps(spec, indent=1, sort_keys=True))
    (path / BUILD_LOG).write_text(json.dumps({"info": info, "curve": curve}))
    return info


def load(name: str, pretrained: str | None, cache_dir: str, arch: dict, build: dict,
         cast_to_mixed_precision: bool) -> Teacher:
    """`conf/teacher/tiny.yaml`'s target: the folder as above, loaded by `load_teacher`, in fp32."""
    if not pretrained:
        pretrained = str(ensure(cache_dir, arch, build))
    teacher = load_teacher(name, pretrained, None, None, None, cast_to_mixed_precision)
    for m in teacher.frozen_modules():  # weights are shipped in fp16; the teacher computes in fp32
        m.float()
    return teacher


# ------------------------------------------------------------------------------------------------ measurement
def measure(teacher: Teacher, resolution: int, num_prompts: int = 64, ws=(0.0, 1.0, 2.0, 3.0, 5.0, 7.0),
            steps: int = 50, seed: int = 0) -> tuple[dict, dict]:
    """DDIM-`steps` adherence of the teacher on held-out prompts, per attribute, for each w; and the images."""
    from ..data.adherence import attribute_rates
    from ..data.shapes import eval_prompts
    from .sampling import initial_noise, sample_teacher

    prompts = eval_prompts(num_prompts, seed)
    noise = initial_noise(teacher, num_prompts, seed, resolution)
    metrics, images = {}, {}
    for w in ws:
        imgs = sample_teacher(teacher, prompts, w, steps, noise)
        rates = attribute_rates(imgs, prompts)
        metrics.update({f"adherence/ddim{steps}_w{w:g}/{k}": v for k, v in rates.items()})
        images[w] = imgs
        log.info("w=%g: %s", w, " ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    return metrics, {"prompts": prompts, "images": images}


def vae_reconstruction(teacher: Teacher, resolution: int, num: int = 256, seed: int = 0) -> dict:
    """Adherence of VAE reconstructions of held-out scenes (rendered with jitter), per attribute."""
    import random

    import numpy as np

    from ..data.adherence import attribute_rates
    from ..data.shapes import caption, render, scenes

    sc = scenes("eval", num, seed)
    rng = random.Random(seed)
    x = torch.from_numpy(np.stack([np.asarray(render(s, resolution, rng)) for s in sc])).permute(0, 3, 1, 2)
    x = x.float() / 127.5 - 1
    rec = teacher.decode_latents(teacher.encode_images(x))
    return {f"vae_reconstruction/{k}": v for k, v in attribute_rates(rec, [caption(s) for s in sc]).items()}


def main(argv: list[str] | None = None) -> Path:
    """`lcm-exp-build-teacher [--out DIR] [--force] [--num-prompts N] [--no-measure] [--samples-dir DIR] [overrides]`."""
    from hydra import compose, initialize_config_dir

    from hydra.utils import instantiate

    from ..config import config_dir
    from .sampling import grid

    p = argparse.ArgumentParser(prog="lcm-exp-build-teacher", description=main.__doc__)
    p.add_argument("--out", help="write the teacher here (e.g. lcm_exp/assets/tiny_teacher) instead of the cache")
    p.add_argument("--force", action="store_true", help="rebuild from scratch even if the folder exists (without it, "
                   "an interrupted build continues from its saved stages in DIR.partial)")
    p.add_argument("--num-prompts", type=int, default=64, help="held-out prompts for the adherence measurement")
    p.add_argument("--no-measure", action="store_true", help="skip the adherence measurement")
    p.add_argument("--samples-dir", help="also write the sample grids, prompts and metrics here (besides MLflow)")
    args, overrides = p.parse_known_args(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    t = cfg.teacher
    if not str(t._target_).endswith("tiny.load"):
        raise SystemExit(f"lcm-exp-build-teacher builds teacher=tiny (got teacher={t.name})")
    spec = recipe(t.arch, t.build)
    path = Path(args.out).resolve() if args.out else cached_folder(t.cache_dir, "tiny", spec)
    tracker = instantiate(cfg.tracking, experiment="lcm-teacher", run_name=f"tiny-{path.name}", start_dir=os.getcwd())
    tracker.start({"recipe": spec, "path": str(path)}, tags={"lcm_exp.teacher": "tiny"})
    status, tmp = "FAILED", tempfile.TemporaryDirectory()
    try:
        if args.force or not (path / "model_index.json").exists():
            if args.force:  # from scratch: neither the folder nor an interrupted build's stages are reused
                import shutil

                for stale in (path, Path(str(path) + ".partial")):
                    shutil.rmtree(stale, ignore_errors=True)
            info = build_into(path, spec, t.cache_dir, _plain(t.build),
                              lambda k, v, s: tracker.log_metrics({f"train/{k}": v}, s))
            tracker.log_metrics({f"build/{k}": v for k, v in info.items() if isinstance(v, float)}, 0)
            print(f"built in {info['total_s']:.0f} s on {info['device']}: {path}")
        elif (path / BUILD_LOG).exists():  # an existing build: log its recorded curves and timings
            rec = json.loads((path / BUILD_LOG).read_text())
            for key, value, step in rec["curve"]:
                tracker.log_metrics({f"train/{key}": value}, step)
            tracker.log_metrics({f"build/{k}": v for k, v in rec["info"].items() if isinstance(v, float)}, 0)
        teacher = instantiate(t, pretrained=str(path))
        if not args.no_measure:
            res = spec["arch"]["resolution"]
            metrics, out = measure(teacher, res, args.num_prompts)
            metrics.update(vae_reconstruction(teacher, res))
            tracker.log_metrics(metrics, 0)
            folder = Path(args.samples_dir or tmp.name)  # stays in place until the tracker has uploaded it
            folder.mkdir(parents=True, exist_ok=True)
            for w, imgs in out["images"].items():
                grid(imgs).save(folder / f"ddim50_w{w:g}.png")
            (folder / "prompts.txt").write_text("\n".join(out["prompts"]) + "\n")
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
            tracker.log_artifact(str(folder), "teacher_samples")
            for k, v in sorted(metrics.items()):
                print(f"{k}: {v:.3f}")
        status = "FINISHED"
    finally:
        tracker.end(status)
        tmp.cleanup()
    print(path)
    return path
