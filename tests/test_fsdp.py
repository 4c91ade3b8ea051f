"""`trainer.strategy=fsdp` on two CPU ranks (gloo), started with `torchrun -m lcm_exp`: accelerate's FSDP2 path
(which lcm_exp selects on CPU ranks itself: accelerate turns FSDP on only for GPU-like ranks).

The sharded student, its optimiser state and the sharded EMA target compute what DDP does at the same global
batch (the same losses within the DDP tolerance, the same final weights); checkpoints hold sharded (DCP) folders
and resume exactly after SIGTERM; the saved networks, the export and the evaluation get the full fp32 weights
gathered on rank 0; `lcm-exp-export` reads an FSDP checkpoint without any process group; bf16 runs end to end."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import ENV, TINY, assert_every_weight_close, final_weights, only_run, same_weights
from test_scale_out import RTOL, losses, sigterm_at, torchrun

pytestmark = pytest.mark.slow
RUN = [*TINY, "trainer.batch_size=4", "trainer.gradient_accumulation_steps=2", "trainer.max_steps=6",
       "trainer.checkpoint_every=3"]
FSDP = [*RUN, "trainer.strategy=fsdp"]


def target(cwd) -> dict[str, torch.Tensor]:
    return {k: v for k, v in final_weights(cwd).items() if k.startswith("target_unet/")}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    torchrun(RUN, cwd)
    return cwd


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fsdp")
    torchrun([*FSDP, "export.enabled=true", "eval.enabled=true", "eval.steps=[1,2]", "eval.num_prompts=2",
              "eval.reference_steps=4"], cwd)
    return cwd


def test_fsdp_follows_ddp(ddp, fsdp):
    a, b = losses(ddp), losses(fsdp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=RTOL), (step, a[step], b[step])
    assert_every_weight_close(final_weights(ddp), final_weights(fsdp))  # (the student's and the target's)


def test_fsdp_run_checkpoints_shards_and_exports_the_full_networks(fsdp):
    from diffusers import DiffusionPipeline

    _, run = only_run(fsdp)
    assert run.data.params["trainer.strategy"] == "fsdp" and run.data.params["world_size"] == "2"
    assert math.isfinite(run.data.metrics["eval/student_2step/psnr_to_ref"])
    (ckpt,) = Path(fsdp).glob("outputs/*/*/checkpoints/checkpoint-6")
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "pytorch_model_fsdp_1").is_dir()  # student, target
    (export,) = Path(fsdp).glob("outputs/*/*/export")
    unet = DiffusionPipeline.from_pretrained(export).unet
    averaged = target(fsdp)
    assert unet.dtype == torch.float32 and all(torch.equal(v, averaged[f"target_unet/{k}"])
                                               for k, v in unet.state_dict().items())


def test_lcm_exp_export_reads_an_fsdp_checkpoint(fsdp, tmp_path):
    """The checkpoint at the last step, exported by `lcm-exp-export` in one process, holds the run's final target."""
    from safetensors.torch import load_file

    (ckpt,) = Path(fsdp).glob("outputs/*/*/checkpoints/checkpoint-6")
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-c", "from lcm_exp.cli import export; export()", f"checkpoint={ckpt}",
                        f"out={out}"], cwd=fsdp, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (weights,) = out.glob("unet/*.safetensors")
    exported, averaged = load_file(str(weights)), target(fsdp)
    assert {f"target_unet/{k}" for k in exported} == averaged.keys()
    assert all(torch.equal(v, averaged[f"target_unet/{k}"]) for k, v in exported.items())


def test_fsdp_preempted_by_sigterm_resumes_exactly(tmp_path, fsdp):
    out, saved = sigterm_at([*FSDP, "trainer.checkpoint_every=1"], tmp_path)
    stopped = int(saved[-1].name.split("-")[1])
    assert 2 <= stopped < 6, out[-3000:]
    r = torchrun([*FSDP, "trainer.checkpoint_every=1", "trainer.resume=latest"], tmp_path)
    assert f"at step {stopped}" in r.stdout + r.stderr  # ("resumed from <checkpoint> at step N": not a fresh start)
    resumed, uninterrupted = losses(tmp_path), losses(fsdp)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(stopped + 1, 7):
        assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])
    assert same_weights(final_weights(tmp_path), final_weights(fsdp))


def test_fsdp_in_bf16(tmp_path):
    from diffusers import DiffusionPipeline

    torchrun([*TINY, "trainer.batch_size=4", "trainer.max_steps=2", "trainer.strategy=fsdp",
              "trainer.mixed_precision=bf16", "export.enabled=true", "trainer.checkpoint_every=2"], tmp_path)
    assert all(math.isfinite(v) for v in losses(tmp_path).values())
    (ckpt,) = Path(tmp_path).glob("outputs/*/*/checkpoints/checkpoint-2")
    assert (ckpt / "pytorch_model_fsdp_0").is_dir()  # (really sharded, not silently DDP)
    (export,) = Path(tmp_path).glob("outputs/*/*/export")
    assert DiffusionPipeline.from_pretrained(export).unet.dtype == torch.float32


def test_fsdp_refuses_a_lora_student(tmp_path):
    r = torchrun([*TINY, "trainer.batch_size=4", "trainer.max_steps=1", "trainer.strategy=fsdp", "student=lora"],
                 tmp_path, expect=None)
    assert r.returncode != 0 and "trainer.strategy=fsdp is not supported here" in r.stderr + r.stdout
