"""Runs `lcm-exp [overrides]` (timed) and measures its student against the teacher, LCM-paper style.

    python scripts/measure_student.py [--prompts 32] [--w W] [overrides...]

For held-out shapes prompts, one initial noise each and one w (default: the middle of the guidance range):
the reference is the teacher's DDIM-50 solution; at 1/2/4/8 steps the student (LCMScheduler,
original_inference_steps = 1000 // skip.k; online and EMA target weights) and the teacher (DDIM) are
compared with it (PSNR on decoded pixels) and by the shapes adherence checker. Prints a table and JSON.
(The per-run evaluation of `lcm-exp` itself lives in lcm_exp/evaluation.py.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--w", type=float, default=None)
    p.add_argument("--steps", default="1,2,4,8")
    args, overrides = p.parse_known_args()
    from hydra import compose, initialize_config_dir

    from lcm_exp.cli import config_dir
    from lcm_exp.config import register
    from lcm_exp.data.adherence import adherence_rate
    from lcm_exp.data.shapes import eval_prompts
    from lcm_exp.teachers.sampling import initial_noise, psnr, sample_student, sample_teacher

    register()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    work = Path(tempfile.mkdtemp(prefix="measure-"))
    cmd = [sys.executable, "-c", "from lcm_exp.cli import train; train()", *overrides,
           f"trainer.checkpoint_every={cfg.trainer.max_steps}", "hydra.run.dir=run"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env={**os.environ})
    train_s = time.perf_counter() - t0
    if r.returncode:
        print(r.stderr[-3000:])
        raise SystemExit(1)
    ckpt = next((work / "run" / "checkpoints").glob("checkpoint-*"))
    from hydra.utils import instantiate

    torch.manual_seed(0)
    teacher = instantiate(cfg.teacher)
    config = dict(teacher.unet.config, time_cond_proj_dim=cfg.student.time_cond_proj_dim)
    online = UNet2DConditionModel.from_config(config)
    online.load_state_dict(load_file(ckpt / "model.safetensors"))
    target = UNet2DConditionModel.from_config(config)
    target.load_state_dict(torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False))
    w = args.w if args.w is not None else 0.5 * (cfg.guidance.w_min + cfg.guidance.w_max)
    prompts = eval_prompts(args.prompts, 1234)
    noise = initial_noise(teacher, len(prompts), 1234, cfg.data.resolution)
    t1 = time.perf_counter()
    ref = sample_teacher(teacher, prompts, w, 50, noise)
    rows = [("teacher_ddim", 50, psnr(ref, ref), adherence_rate(ref, prompts))]
    for n in [int(s) for s in args.steps.split(",")]:
        for name, fn in (("teacher_ddim", lambda: sample_teacher(teacher, prompts, w, n, noise)),
                         ("student", lambda: sample_student(online.eval(), teacher, prompts, w, n, noise, cfg.skip.k)),
                         ("student_ema", lambda: sample_student(target.eval(), teacher, prompts, w, n, noise,
                                                                cfg.skip.k))):
            imgs = fn()
            rows.append((name, n, psnr(imgs, ref), adherence_rate(imgs, prompts)))
    eval_s = time.perf_counter() - t1
    print(f"overrides: {' '.join(overrides) or '(none)'}   w={w}   train {train_s:.0f} s   measure {eval_s:.0f} s")
    print(f"{'model':14s} {'steps':>5s} {'psnr_to_ref':>11s} {'adherence':>9s}")
    for name, n, ps, ad in rows:
        print(f"{name:14s} {n:5d} {ps:11.2f} {ad:9.3f}")
    print(json.dumps({"train_s": train_s, "w": w, "rows": rows}))


if __name__ == "__main__":
    main()
