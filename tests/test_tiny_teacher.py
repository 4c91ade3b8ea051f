"""The embedded default teacher (`teacher=tiny`): shipped weights, SD-style loading, tokenizer, VAE, sampling,
and its build command at a tiny scale."""
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from mlflow.tracking import MlflowClient

from lcm_exp.data.shapes import caption, eval_prompts, scenes
from lcm_exp.teachers import load_teacher
from lcm_exp.teachers.sampling import initial_noise, sample_teacher
from lcm_exp.teachers.tiny import ASSETS, RECIPE_FILE, ensure, main, recipe, vae_reconstruction
from lcm_exp.teachers.tiny_recipe import vocabulary
from parts import part


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return part("teacher", "tiny")


def test_default_recipe_is_the_shipped_teacher(teacher, tmp_path):
    assert ensure(str(tmp_path)) == ASSETS  # no build, nothing written to the cache
    assert not (tmp_path / "teachers").exists()
    assert json.loads((ASSETS / RECIPE_FILE).read_text()) == recipe()
    assert teacher.path == str(ASSETS) and teacher.prediction_type == "epsilon"
    assert teacher.scheduler.config.beta_schedule == "scaled_linear" and teacher.num_train_timesteps == 1000
    assert all(p.dtype == torch.float32 for m in teacher.frozen_modules() for p in m.parameters())
    assert 1e6 < sum(p.numel() for p in teacher.unet.parameters()) < 4e6
    assert sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file()) < 9e6
    # like SD 1.5: the plain diffusers pipeline loads the same folder
    pipe = StableDiffusionPipeline.from_pretrained(str(ASSETS))
    assert pipe.vae.config.scaling_factor == teacher.vae.config.scaling_factor != 1.0
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.in_channels == 4


def test_latents_are_unit_scaled(teacher):
    from lcm_exp.data.shapes import render

    x = torch.stack([torch.from_numpy(__import__("numpy").asarray(render(s, 32))).permute(2, 0, 1)
                     for s in scenes("train", 64, 3)]).float() / 127.5 - 1
    z = teacher.encode_images(x)
    assert z.shape == (64, 4, 8, 8) and 0.7 < float(z.std()) < 1.4


def test_tokenizer_makes_shapes_words_single_tokens(teacher):
    tok = teacher.tokenizer
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    longest = max((caption(s) for s in scenes("train", 500, 0)), key=lambda c: len(c.split()))
    assert len(tok(longest).input_ids) == len(longest.split()) + 2 <= tok.model_max_length


def test_vae_reconstructions_pass_the_checker(teacher):
    rates = vae_reconstruction(teacher, 32, num=64, seed=5)
    assert rates["vae_reconstruction/all"] >= 0.95, rates


def test_ddim_samples_of_held_out_prompts_adhere(teacher):
    from lcm_exp.data.adherence import attribute_rates

    prompts = eval_prompts(64, seed=7)  # not the prompts or noise of the reported measurement (seed 0)
    images = sample_teacher(teacher, prompts, w=5.0, steps=50, latents=initial_noise(teacher, 64, 7, 32))
    assert images.shape == (64, 3, 32, 32)
    rates = attribute_rates(images, prompts)
    assert rates["all"] >= 0.75, rates
    assert min(rates[k] for k in ("colour", "position", "size", "background")) >= 0.95, rates


def test_build_command_at_tiny_scale(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "teacher"
    small = ["teacher.build.vae_steps=3", "teacher.build.unet_steps=3", "teacher.build.num_samples=64",
             "teacher.build.vae_batch=4", "teacher.build.unet_batch=4", f"teacher.cache_dir={tmp_path}"]
    path = main(["--out", str(out), "--no-measure", *small])
    assert path == out and json.loads((out / RECIPE_FILE).read_text())["build"]["unet_steps"] == 3
    t = load_teacher("tiny", str(out), None, None, None, True)  # the plain SD loader
    assert t.vae.config.scaling_factor != 1.0 and t.unet.config.in_channels == 4
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    image = pipe("a small red circle in the center on a white background", height=32, width=32,
                 num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lcm-teacher").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["recipe.build.unet_steps"] == "3"
    assert len(client.get_metric_history(run.info.run_id, "train/unet/loss")) >= 1
    # a recipe other than the shipped one is built into the cache on first use, then reused
    build = {"vae_steps": 3, "unet_steps": 3, "num_samples": 64, "vae_batch": 4, "unet_batch": 4}
    cached = ensure(str(tmp_path), build=build)
    assert cached.parent == tmp_path / "teachers" and cached.name.startswith("tiny-")
    assert (cached / "model_index.json").exists() and ensure(str(tmp_path), build=build) == cached


def test_config_recipe_equals_the_code_defaults():
    from hydra import compose, initialize_config_dir

    from lcm_exp.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config")
    assert cfg.teacher.name == "tiny" and cfg.data.resolution == recipe()["arch"]["resolution"]
    assert recipe(cfg.teacher.arch, cfg.teacher.build) == recipe()


def test_unet_stage_resumes_where_it_was_interrupted(tmp_path):
    """An interrupted build continues from its last saved state and ends with the weights of an uninterrupted one."""
    from lcm_exp.teachers.tiny_recipe import DEFAULT_BUILD, make_models, train_unet

    arch = dict(unet_channels=[16, 32], unet_norm_groups=8, unet_attention_levels=1, text_hidden=16, text_heads=2)
    b = {**DEFAULT_BUILD, "unet_steps": 4, "unet_batch": 4, "unet_warmup": 1}
    latents, captions = torch.randn(8, 4, 8, 8), [caption(s) for s in scenes("train", 8, 0)]

    calls = []

    def run(work, steps):
        torch.manual_seed(0)
        _, text, tok, unet, sched = make_models(arch)
        calls.clear()
        unet.register_forward_hook(lambda *_: calls.append(1))  # one UNet forward per training step
        ema, _ = train_unet(unet, text, tok, sched, latents, captions, {**b, "unet_steps": steps}, "cpu",
                            lambda *_: None, work=work, every=2)
        return ema.state_dict()

    full = run(None, 4)
    assert len(calls) == 4
    work = tmp_path / "work"
    work.mkdir()
    run(work, 3)  # "interrupted" after step 3: its last saved state is step 2
    assert torch.load(work / "unet_state.pt", weights_only=False)["step"] == 2
    resumed = run(work, 4)  # steps 3 and 4 again, from the saved state
    assert len(calls) == 2  # it continued from step 2 rather than starting over
    for k in full:
        torch.testing.assert_close(resumed[k], full[k])
