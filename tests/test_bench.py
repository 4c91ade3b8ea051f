"""lcm-exp-bench: the reference step (the diffusers script's, written in bench/reference.py with no lcm_exp code)
and ours (built by runner.build from every group) compute the same loss on the same inputs; ours honours the
method group; the command's last line is one JSON object with the contract keys. (Speed itself is reported by
the command, never asserted here.)"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lcm_exp.bench import reference as reference_module
from lcm_exp.bench.measure import ABLATIONS, Ours, ReferencePath, ablations, count_flops, inert, variant
from lcm_exp.config import config_dir


def compose_bench(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("bench", overrides=["data.resolution=32", "trainer.batch_size=2", "trainer.cpu=true",
                                           *overrides])


def batch_of(cfg):
    from hydra.utils import instantiate

    return next(iter(instantiate(cfg.data)(batch_size=cfg.trainer.batch_size)))


@pytest.mark.parametrize("loss", ["l2", "huber"])
def test_reference_and_ours_compute_the_same_loss(tmp_path, monkeypatch, loss):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    cfg = compose_bench(f"loss={loss}", f"data.cache_dir={tmp_path}", "bench.cached=false")
    batch = batch_of(cfg)
    ours = Ours(cfg, batch)
    initial = {k: v.clone() for k, v in ours.parts.student.unet.state_dict().items()}
    ref = ReferencePath(cfg, ours, batch)
    # the same networks, loaded separately: the teacher from the config, the student copied before any step
    teacher_ours, teacher_ref = ours.parts.teacher.unet.state_dict(), ref.ref.teacher.unet.state_dict()
    assert all(torch.equal(teacher_ours[k], teacher_ref[k]) for k in teacher_ours)
    loss_ref = ref.step(7)
    loss_ours = ours.step(7)
    assert loss_ref.item() > 0
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-4, atol=1e-7)
    # and both then trained the student the same way: equal gradients made equal AdamW first steps (an AdamW
    # first step is about lr·sign(g), so a gradient element within rounding of 0 may step either way: 0.1% may)
    after_ours, after_ref = ours.parts.student.unet.state_dict(), ref.ref.unet.state_dict()
    moved = [k for k in after_ours if not torch.equal(after_ours[k], initial[k])]
    assert len(moved) > 0.5 * len(after_ours)
    differ = sum(int((~torch.isclose(after_ours[k], after_ref[k], rtol=1e-4, atol=1e-7)).sum()) for k in moved)
    assert differ <= 1e-3 * sum(after_ours[k].numel() for k in moved)
    ours.parts.student.unet.load_state_dict(initial)
    loss_other_seed = ours.step(8)
    assert abs(loss_other_seed.item() - loss_ref.item()) > 1e-6  # the comparison is not vacuous


def test_cached_batches_give_ours_the_same_loss(tmp_path, monkeypatch):
    """bench.cached: ours reads the posterior and the text embeddings (data=cached) instead of encoding; the
    posterior draw is the same, so the loss is the reference's."""
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    cfg = compose_bench(f"data.cache_dir={tmp_path}")
    batch = batch_of(cfg)
    ours = Ours(cfg, batch)
    assert "latent_mean" in ours.batch and "pixels" not in ours.batch
    ref = ReferencePath(cfg, ours, batch)
    torch.testing.assert_close(ours.step(3), ref.step(3),
                               rtol=1e-4, atol=1e-7)


def test_ours_is_the_method_the_config_names(tmp_path, monkeypatch):
    """method=ct is benchmarked as consistency training: its target point is the forward process's, not the
    teacher's solver step, so its loss differs from the reference's (LCD) on the same inputs, and it equals
    what the CT method computes from the same draws."""
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    cfg = compose_bench(f"data.cache_dir={tmp_path}", "method=ct", "bench.cached=false")
    batch = batch_of(cfg)
    ours = Ours(cfg, batch)
    assert type(ours.parts.step.method).__name__ == "ConsistencyTraining"
    calls = []
    teacher_forward = ours.parts.teacher.unet.forward
    ours.parts.teacher.unet.forward = lambda *a, **k: calls.append(1) or teacher_forward(*a, **k)
    ref = ReferencePath(cfg, ours, batch)
    loss_ct, loss_lcd = ours.step(5), ref.step(5)
    assert not calls  # consistency training never runs the teacher's UNet
    assert abs(loss_ct.item() - loss_lcd.item()) > 1e-6


def test_reference_shares_no_code_with_lcm_exp():
    tree = ast.parse(Path(reference_module.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m is None or m.startswith("lcm_exp")], imported


def test_bench_defaults_to_the_tiny_test_teacher():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("bench")
    assert cfg.teacher._target_ == "lcm_exp.teachers.tiny_random.load" and cfg.teacher.name == "tiny_random"
    assert cfg.data.resolution == 64 and cfg.trainer.batch_size == 8


def test_ablations_resolve_and_inert_ones_are_named():
    each = ablations(["each"])
    assert set(each) == set(ABLATIONS) and each["batched_cfg"] == ["trainer.batched_cfg=false"]
    assert set(each["all"]) >= {"trainer.batched_cfg=false", "bench.cached=false", "optim.fused=false"}
    assert list(ablations(["cached", "each"]))[0] == "cached"
    with pytest.raises(ValueError, match="unknown switch"):
        ablations(["batched"])
    cfg = compose_bench()
    assert variant(cfg, ABLATIONS["all"]).trainer.batched_cfg is False
    assert "fp32" in inert("cast_frozen", cfg)
    assert inert("cast_frozen", compose_bench("trainer.mixed_precision=bf16")) is None
    assert all(inert(n, cfg) is None for n in ("batched_cfg", "teacher_first", "cached", "fused_adamw", "all"))
    assert "already off" in inert("batched_cfg", compose_bench("trainer.batched_cfg=false"))


def test_flops_count_the_reference_s_extra_passes(tmp_path, monkeypatch):
    """The reference encodes images and prompts and runs the teacher twice; ours (cached, batched CFG) does
    neither: the same UNet FLOPs otherwise, so fewer per step."""
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    cfg = compose_bench(f"data.cache_dir={tmp_path}")
    batch = batch_of(cfg)
    ours = Ours(cfg, batch)
    ref = ReferencePath(cfg, ours, batch)
    assert 0 < count_flops(ours, 1) < count_flops(ref, 1)


def test_bench_command_prints_json_last(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from lcm_exp.cli import bench; bench()", "data.resolution=32",
                        "trainer.batch_size=2", "bench.warmup=1", "bench.rounds=2", "bench.steps_per_round=1",
                        "bench.flops=true", f"data.cache_dir={tmp_path}",
                        "bench.ablate=[batched_cfg,cast_frozen]", "bench.methods=[dmd2]"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("reference_samples_per_s", "ours_samples_per_s", "speedup", "reference_peak_mem_mb",
                "ours_peak_mem_mb", "device", "method"):
        assert key in result
    assert result["device"] == "cpu" and result["steps_timed"] == 2
    assert result["method"] == "lcm_exp.distill.methods.lcd.Distillation"
    assert result["speedup"] == result["ours_samples_per_s"] / result["reference_samples_per_s"]
    # the ablation ran interleaved with the others; nothing is cast in fp32, so there was no variant to time
    assert result["without_batched_cfg_samples_per_s"] > 0
    assert result["speedup_without_batched_cfg"] == (result["without_batched_cfg_samples_per_s"]
                                                     / result["reference_samples_per_s"])
    assert "without_cast_frozen_samples_per_s" not in result and "nothing is cast in fp32" in r.stderr + r.stdout
    assert 0 < result["ours_tflop_per_step"] < result["reference_tflop_per_step"]
    # DMD2's step, interleaved too: 5 fake-score updates (forward and backward each) make it several LCD steps
    assert 0 < result["speedup_method_dmd2"] < result["speedup"] / 2
    if sys.platform == "linux":  # CPU peak memory: at least the networks each path keeps resident
        assert result["reference_peak_mem_mb"] > 5 and result["ours_peak_mem_mb"] > 5
        assert result["method_dmd2_peak_mem_mb"] > result["ours_peak_mem_mb"]  # (the fake score and its AdamW)
