"""Extending lcm_exp without editing it (issue 19): a user's modules (tests/extension/my_parts.py, my_family.py) and
YAML options (tests/extension/conf/) add a solver, a loss, a method, a guidance sampler, a student kind, an
SD-shaped teacher and a teacher family (flow matching) through `_target_` alone; each trains 3 real steps, and
each visibly changes what is trained."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from jobs import TINY, final_weights, lcm_exp, loss_history

pytestmark = pytest.mark.slow
EXT = Path(__file__).parent / "extension"
RUN = [*TINY, "trainer.max_steps=3", f"hydra.searchpath=[file://{EXT / 'conf'}]"]
# (the override, the group option a run records, files a user writes: module(s) + YAML)
CASES = [
    (["solver=midpoint"], ("solver", "midpoint")),
    (["loss=l1"], ("loss", "l1")),
    (["method=interpolated"], ("method", "interpolated")),
    (["method=critic"], ("method", "critic")),
    (["guidance=constant"], ("guidance", "constant")),
    (["student=head_only"], ("student", "head_only")),
]


def run(tmp_path, *overrides):
    path = os.pathsep.join(p for p in (str(EXT), os.environ.get("PYTHONPATH", "")) if p)  # the user's module
    lcm_exp([*RUN, *overrides], tmp_path, env={"PYTHONPATH": path})
    history, run = loss_history(tmp_path)
    assert run.info.status == "FINISHED" and sorted(history) == [1, 2, 3]
    assert all(math.isfinite(v) for values in history.values() for v in values)
    return {s: next(iter(v)) for s, v in history.items()}, run


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    losses, _ = run(tmp_path_factory.mktemp("default"))
    return losses


@pytest.mark.parametrize("overrides,choice", CASES, ids=[c[0][0] for c in CASES])
def test_a_users_part_trains(tmp_path, default, overrides, choice):
    losses, mlflow_run = run(tmp_path, *overrides)
    group, option = choice
    assert mlflow_run.data.params[group] == option
    assert mlflow_run.data.params[f"{group}._target_"].startswith("my_parts.")
    assert losses[1] != default[1] or (group == "student" and losses[3] != default[3])  # (a student kind: same
    # first loss, as every kind starts as the teacher; then it trains other weights)


def test_a_users_method_trains_its_auxiliary_network_and_checkpoints_it(tmp_path):
    """The critic of `my_parts.Critic` is prepared, trained (one update per micro-step) and checkpointed beside the
    student, with its optimiser, and a resume continues both exactly."""
    from safetensors.torch import load_file

    run(tmp_path, "method=critic", "trainer.checkpoint_every=1")
    one, two = sorted(tmp_path.glob("outputs/*/*/checkpoints/checkpoint-*"), key=lambda p: int(p.name[11:]))[-2:]
    critic = [load_file(c / "model_1.safetensors") for c in (one, two)]
    assert critic[0].keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert not torch.equal(critic[0]["0.weight"], critic[1]["0.weight"])  # trained between the steps
    assert (two / "custom_checkpoint_1.pkl").exists()  # its Adam state
    history, _ = loss_history(tmp_path)
    path = os.pathsep.join(p for p in (str(EXT), os.environ.get("PYTHONPATH", "")) if p)
    lcm_exp([*RUN, "method=critic", "trainer.max_steps=4", f"trainer.resume={two}"], tmp_path,
            env={"PYTHONPATH": path})
    (cut := tmp_path / "through").mkdir()
    lcm_exp([*RUN, "method=critic", "trainer.max_steps=4"], cut, env={"PYTHONPATH": path})
    resumed, _ = loss_history(tmp_path)
    through, _ = loss_history(cut)
    assert resumed[4] == through[4]  # the critic and its optimiser continued exactly


def test_a_users_student_kind_trains_what_it_says(tmp_path, default):
    run(tmp_path, "student=head_only")
    weights = final_weights(tmp_path)
    from diffusers import UNet2DConditionModel
    from omegaconf import OmegaConf

    from lcm_exp.teachers.tiny_random import DEFAULT_ARCH, cached_folder

    (cfg,) = [OmegaConf.load(p) for p in tmp_path.glob("outputs/*/*/.hydra/config.yaml")]
    folder = cached_folder(cfg.teacher.cache_dir, "tiny_random", {**DEFAULT_ARCH, **cfg.teacher.arch})
    start = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()  # the run's teacher
    trained = {k for k in start if not torch.equal(start[k], weights[f"student_unet/{k}"])}
    assert trained and all(k.startswith(("conv_out", "conv_norm_out")) for k in trained)


def test_an_sd_shaped_teacher_is_one_yaml(tmp_path):
    from lcm_exp.teachers.tiny_layouts import build

    folder = build("sd15", tmp_path / "sd15")
    losses, mlflow_run = run(tmp_path, "teacher=my_sd", f"teacher.pretrained={folder}")
    assert mlflow_run.data.params["teacher"] == "my_sd"


def test_a_teacher_family_of_ones_own_trains_validates_exports_and_evaluates(tmp_path, default):
    """A flow-matching family (my_family.py + conf/teacher/flow.yaml): its schedule drives the LCD step, its
    samplers drive validation, the evaluation and the export, which loads back with plain diffusers."""
    losses, mlflow_run = run(tmp_path, "teacher=flow", "eval.enabled=true", "eval.steps=[1,2]", "eval.num_prompts=2",
                             "eval.reference_steps=4", "export.enabled=true")
    assert mlflow_run.data.params["teacher"] == "flow" and losses[1] != default[1]  # another schedule, another loss
    metrics = mlflow_run.data.metrics
    for model in ("student", "teacher_ddim"):
        assert all(math.isfinite(metrics[f"eval/{model}_{n}step/psnr_to_ref"]) for n in (1, 2))
    assert not any("teacher_dpmpp" in k for k in metrics)  # (a sampler the family does not have)
    assert list(tmp_path.glob("outputs/*/*/validation/step_000003/student.png"))

    import sys

    from diffusers import DiffusionPipeline

    sys.path.insert(0, str(EXT))
    try:
        from my_family import FlowConsistencyScheduler, FlowSchedule

        (export,) = tmp_path.glob("outputs/*/*/export")
        pipe = DiffusionPipeline.from_pretrained(export)
        assert isinstance(pipe.scheduler, FlowConsistencyScheduler)
        image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
        assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0
        # the schedule inverts its own forward process (the velocity is ε − x0)
        x0, eps, t = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([0, 500, 999])
        z = FlowSchedule(1000).add_noise(x0, eps, t)
        x0_hat, eps_hat = FlowSchedule(1000).x0_and_eps(eps - x0, t, z)
        assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)
    finally:
        sys.path.remove(str(EXT))


def test_a_vp_only_solver_on_another_family_is_a_one_line_error(tmp_path):
    path = os.pathsep.join(p for p in (str(EXT), os.environ.get("PYTHONPATH", "")) if p)
    r = lcm_exp([*RUN, "teacher=flow", "solver=euler"], tmp_path, expect=2, env={"PYTHONPATH": path})
    last = (r.stdout + r.stderr).strip().splitlines()[-1]
    assert "solver=euler is written for a VP (DDPM) noise schedule" in last and "solver=ddim" in last
    assert "Traceback" not in r.stderr
