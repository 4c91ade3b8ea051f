"""Issue 7: tiny SD-1.5-, SD-2.1-v- and SDXL-shaped pipelines (real layouts and scheduler configs) distilled into
full and LoRA students by `lcm-exp`, exported, and reloaded and sampled with plain diffusers."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
SHORT = ["trainer.max_steps=2", "trainer.batch_size=2", "trainer.log_every=1", "data.resolution=32",
         "data.num_samples=64"]


def cli(func: str, *args: str, cwd: Path) -> str:
    p = subprocess.run([sys.executable, "-c", f"from lcm_exp.cli import {func}; {func}()", *args], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    from lcm_exp.teachers.tiny_layouts import build

    root = tmp_path_factory.mktemp("layouts")
    return {name: build(name, root / name) for name in ("sd15", "sd21", "sdxl")}


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def model_artifact(cwd: Path) -> Path:
    """The run's MLflow artifact `model`, fetched through MLflow (wherever the store keeps artifacts)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lcm-distill").experiment_id])
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model", tracking_uri=uri,
                                                    dst_path=str(cwd / "downloaded")))


def sample(pipe, steps: int = 4, **kw):
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=steps, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == (1, 32, 32, 3) and (out >= 0).all() and (out <= 1).all()
    return out


def test_acceptance_sd15_lora_then_full(layouts, cache, tmp_path):
    """The issue's acceptance commands: LoRA → `model` loads onto the base with load_lora_weights and samples;
    full → a pipeline folder DiffusionPipeline loads with an LCMScheduler."""
    from diffusers import DiffusionPipeline, LCMScheduler

    d = layouts["sd15"]
    common = [f"data.cache_dir={cache}", "data.num_samples=64", "eval.steps=[4]", "eval.num_prompts=2",
              "eval.reference_steps=4", "trainer.batch_size=2"]
    (tmp_path / "lora").mkdir()
    out = cli("train", "teacher=sd15", f"teacher.pretrained={d}", "student=lora", "trainer.max_steps=3",
              "data.resolution=32", *common, cwd=tmp_path / "lora")
    art = model_artifact(tmp_path / "lora")
    assert "lcm-exp: exported model:" in out
    assert sorted(p.name for p in art.iterdir()) == ["lcm_exp_export.json", "pytorch_lora_weights.safetensors",
                                                     "scheduler"]
    info = json.loads((art / "lcm_exp_export.json").read_text())
    assert info["kind"] == "lora" and info["base_model"] == str(d) and info["original_inference_steps"] == 1000 // 20
    pipe = DiffusionPipeline.from_pretrained(info["base_model"])
    pipe.scheduler = LCMScheduler.from_pretrained(art, subfolder="scheduler")
    base = sample(pipe)
    pipe.load_lora_weights(art)
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    lora = sample(pipe, guidance_scale=1.0)
    assert not (base == lora).all()  # the adapters changed the model

    (tmp_path / "full").mkdir()
    cli("train", "teacher=sd15", f"teacher.pretrained={d}", "student=full", "trainer.max_steps=3",
        "data.resolution=32", *common, cwd=tmp_path / "full")
    art = model_artifact(tmp_path / "full")
    assert not glob.glob(str(art / "**" / "*.bin"), recursive=True)  # safetensors only
    pipe = DiffusionPipeline.from_pretrained(art)
    assert type(pipe).__name__ == "LatentConsistencyModelPipeline" and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 50 and pipe.unet.config.time_cond_proj_dim == 256
    sample(pipe, guidance_scale=8.0)


def run_in_process(overrides: list[str], cwd: Path, monkeypatch):
    """`lcm-exp` composed and run in this process (saves the interpreter start of a subprocess)."""
    from hydra import compose, initialize_config_dir

    from lcm_exp.cli import config_dir
    from lcm_exp.runner import run

    monkeypatch.chdir(cwd)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return cfg, run(cfg)


@pytest.mark.parametrize("layout", ["sd21", "sdxl"])
def test_teacher_with_full_and_lora_students(layout, layouts, cache, tmp_path, monkeypatch):
    """One short run per student on SD 2.1 (v-prediction) and SDXL; each export reloads with plain diffusers
    and samples in 4 steps."""
    from diffusers import DiffusionPipeline, LCMScheduler

    for student in ("full", "lora"):
        cwd = tmp_path / student
        cwd.mkdir()
        cfg, loss = run_in_process([f"teacher={layout}", f"teacher.pretrained={layouts[layout]}", f"student={student}",
                                    f"data.cache_dir={cache}", "eval.enabled=false", *SHORT], cwd, monkeypatch)
        assert 0 < loss < 10
        art = model_artifact(cwd)
        if student == "full":
            pipe = DiffusionPipeline.from_pretrained(art)
            assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 256
        else:
            pipe = DiffusionPipeline.from_pretrained(layouts[layout])
            pipe.scheduler = LCMScheduler.from_pretrained(art, subfolder="scheduler")
            pipe.load_lora_weights(art)
        want = "v_prediction" if layout == "sd21" else "epsilon"
        assert pipe.scheduler.config.prediction_type == want
        assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if layout == "sdxl" else
                                       "LatentConsistencyModelPipeline" if student == "full" else "StableDiffusionPipeline")
        sample(pipe, guidance_scale=1.0 if student == "lora" else 8.0)


def test_export_command_from_a_checkpoint(layouts, cache, tmp_path):
    """`lcm-exp-export checkpoint=...` rebuilds the run's student from its config and exports that checkpoint
    (the run: consistency training from scratch with a stochastic-depth student)."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    cli("train", "teacher=sd15", f"teacher.pretrained={layouts['sd15']}", f"data.cache_dir={cache}",
        "eval.enabled=false", "trainer.checkpoint_every=2", "student.stochastic_depth=0.2", "method=ct",
        "method.from_scratch=true", *SHORT, cwd=tmp_path)
    (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/checkpoint-2")
    out = cli("export", f"checkpoint={ckpt}", f"out={tmp_path / 'exported'}", cwd=tmp_path)
    assert f"exported step 2 (full, target) to {tmp_path / 'exported'}" in out
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exported")
    final = UNet2DConditionModel.from_pretrained(ckpt.parents[1] / "target_unet")  # the run's final EMA = step 2
    for (n, a), (_, b) in zip(pipe.unet.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), n
    sample(pipe, guidance_scale=8.0)


def test_lora_export_from_a_checkpoint(layouts, cache, tmp_path):
    """A LoRA run's checkpoint exports to pytorch_lora_weights.safetensors equal to the run's own final LoRA
    weights (the checkpoint is the last step), and `load_lora_weights` puts them onto the base model."""
    from diffusers import DiffusionPipeline, LCMScheduler
    from safetensors.torch import load_file

    cli("train", "teacher=sd15", f"teacher.pretrained={layouts['sd15']}", f"data.cache_dir={cache}",
        "eval.enabled=false", "student=lora", "student.lora_rank=4", "trainer.checkpoint_every=2", *SHORT, cwd=tmp_path)
    (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/checkpoint-2")
    cli("export", f"checkpoint={ckpt}", f"out={tmp_path / 'exported'}", "model=online", cwd=tmp_path)
    exported = load_file(tmp_path / "exported" / "pytorch_lora_weights.safetensors")
    final = load_file(ckpt.parents[1] / "student_lora" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == final.keys() and len(exported) > 0
    for k in exported:
        assert torch.equal(exported[k], final[k]), k
    pipe = DiffusionPipeline.from_pretrained(layouts["sd15"], safety_checker=None)
    pipe.scheduler = LCMScheduler.from_pretrained(tmp_path / "exported", subfolder="scheduler")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(tmp_path / "exported")
    assert any("lora" in k for k in pipe.unet.state_dict()) and len(pipe.unet.state_dict()) > len(before)
    sample(pipe, guidance_scale=1.0)
