"""Composition of every option of every group, each option against its target's signature (defaults written
once, in the YAML); bad overrides fail at once with a clear message."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hydra.errors import ConfigCompositionException, MissingConfigException

from lcm_exp.cli import config_dir
from lcm_exp.config.schema import RUNTIME, ConfigError, check_group, parameters, validate

CONF = Path(config_dir())
GROUPS = ["teacher", "student", "method", "solver", "loss", "guidance", "ema", "skip", "data", "optim", "trainer",
          "tracking", "eval", "export"]


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_contract_groups_and_options_exist():
    for group in GROUPS + ["experiment"]:
        assert options(group), group
    for group, required in {"teacher": {"tiny_random", "sd15", "sd21"}, "student": {"full"},
                            "solver": {"ddim", "euler", "heun"}, "loss": {"l2", "huber"},
                            "data": {"shapes", "webdataset"}, "optim": {"adamw", "adamw8bit"}}.items():
        assert required <= set(options(group)), group


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_agrees_with_its_target_and_writes_its_defaults_once(group, option):
    """The option's keys are exactly what its target takes (no unknown key, every parameter without a default
    set, each value of its annotated type), and none of them has a second default in the code."""
    cfg = compose("config", overrides=[f"{group}={option}"])
    node = cfg[group]
    assert node["_target_"].startswith("lcm_exp.")
    check_group(group, node)
    validate(cfg)
    params, open_kwargs, hints = parameters(node["_target_"])
    assert not open_kwargs
    keys = {k for k in node if not k.startswith("_")}
    assert keys == {n for n in params if n not in RUNTIME[group]}, "the YAML sets every setting of the target"
    assert all(params[k].default is params[k].empty for k in keys), "no second default in the code"
    assert all(k in hints for k in keys), "every setting has a type"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(experiment):
    cfg = compose("config", overrides=[f"experiment={experiment}"])
    assert cfg.trainer.max_steps > 0


def test_contract_keys_are_overridable():
    cfg = compose("config", overrides=[
        "teacher=sd15", "teacher.pretrained=/x", "teacher.revision=main", "student=lora", "student.lora_rank=8",
        "loss=huber", "loss.huber_c=0.01", "guidance.w_min=3", "guidance.w_max=9", "ema.decay=0.9", "skip.k=10",
        "data=webdataset", "data.urls='/d/{0..9}.tar'", "data.resolution=32", "optim.lr=3e-5", "optim.weight_decay=0.01",
        "trainer.max_steps=7", "trainer.batch_size=2", "trainer.seed=3", "trainer.mixed_precision=bf16",
        "tracking.uri=http://127.0.0.1:5000", "tracking.experiment=x", "eval.steps=[1,4]"])
    validate(cfg)
    assert (cfg.skip.k, cfg.loss.huber_c, cfg.guidance.w_max, cfg.ema.decay, cfg.trainer.batch_size) == (10, 0.01, 9, 0.9, 2)
    assert cfg.student.lora_rank == 8 and cfg.teacher.revision == "main"
    assert list(cfg.eval.steps) == [1, 4]


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as e:
        compose("config", overrides=["loss=l3"])
    assert "l2" in str(e.value) and "huber" in str(e.value)


@pytest.mark.parametrize("override,needle", [("loss.hubr_c=0.1", "hubr_c"), ("trainer.max_step=3", "max_step")])
def test_misspelt_key_fails_at_composition(override, needle):
    with pytest.raises(ConfigCompositionException) as e:
        compose("config", overrides=[override])
    assert needle in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override,needle", [
    (["skip.k=abc"], "Invalid value for skip.k: abc. Expected a value of type int"),
    (["trainer.max_steps=1.5"], "Invalid value for trainer.max_steps: 1.5"),
    (["+trainer.max_stpes=3"], "Unknown key trainer.max_stpes: lcm_exp.train.trainer.Trainer has no such setting. Did you "
                               "mean trainer.max_steps?"),
    (["student=lora", "+student.stochastic_depth=0.1"], "Unknown key student.stochastic_depth"),
    (["+data.output_dir=x"], "Unknown key data.output_dir"),
    (["+trainer.job_dir=x"], "trainer.job_dir is passed by the runner at run time"),
    (["~loss.huber_c"], "loss.huber_c must be set"),
    (["student._target_=no_such_module.build"], "student._target_=no_such_module.build cannot be imported"),
])
def test_keys_and_types_are_checked_against_the_target(override, needle):
    cfg = compose("config", overrides=override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


@pytest.mark.parametrize("override,needle", [
    (["skip.k=0"], "skip.k"),
    (["guidance.w_min=9", "guidance.w_max=3"], "guidance.w_min"),
    (["trainer.mixed_precision=fp8"], "trainer.mixed_precision"),
    (["data.resolution=30"], "data.resolution"),
    (["trainer.attention=flash"], "trainer.attention"),
    (["trainer.strategy=zero3"], "trainer.strategy"),
    (["eval.steps=[0,4]"], "eval.steps"),
    (["export.model=best"], "export.model"),
    (["optim.lr=0"], "optim.lr"),
])
def test_impossible_values_are_rejected_by_their_part_naming_the_key(override, needle, tmp_path):
    """Each part checks its own values as it is built (from the options, as the runner builds them)."""
    from lcm_exp.cli import _config_error

    cfg = compose("config", overrides=override)
    group = needle.split(".")[0]
    with pytest.raises(Exception) as e:  # (Hydra's instantiate wraps what a target raises)
        made = instantiate(cfg[group])
        if callable(made) and hasattr(made, "keywords"):  # a partial: call it with what the runner passes
            runtime = {"trainer": {}, "eval": {"device": "cpu"}, "data": {"batch_size": 1, "teacher": None},
                       "optim": {"params": [torch.nn.Parameter(torch.zeros(1))]}}[group]
            made(**runtime)
    assert isinstance(_config_error(e.value), ConfigError) and needle in str(_config_error(e.value))


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-c", "from lcm_exp.cli import train; train()", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_option_fails_fast_naming_choices(tmp_path):
    r = run_cli("loss=l3", cwd=tmp_path)
    assert r.returncode != 0
    assert "l2" in r.stderr and "huber" in r.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_impossible_value_fails_before_loading_models(tmp_path):
    r = run_cli("skip.k=0", "teacher=sd15", "teacher.pretrained=/nonexistent", cwd=tmp_path)
    assert r.returncode != 0
    assert "skip.k" in r.stderr and "Expected" in r.stderr
    assert "pipeline folder" not in r.stderr and "Traceback" not in r.stderr  # before the teacher was looked at


def test_cfg_job_prints_every_group(tmp_path):
    r = run_cli("--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for group in GROUPS:
        assert f"\n{group}:" in "\n" + r.stdout
