"""Composition of every option of every group; bad overrides fail at once with a clear message."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from lcm_exp.cli import config_dir
from lcm_exp.config import ConfigError, register, validate

CONF = Path(config_dir())
GROUPS = ["teacher", "student", "solver", "loss", "guidance", "ema", "skip", "data", "optim", "trainer", "tracking",
          "eval"]


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    register()
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
def test_every_option_composes_and_names_a_target(group, option):
    cfg = compose("config", overrides=[f"{group}={option}"])
    assert cfg[group]["_target_"].startswith("lcm_exp.")
    if group != "data" or option != "webdataset":  # data.urls is required (???) there
        validate(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(experiment):
    cfg = compose("config", overrides=[f"experiment={experiment}"])
    assert cfg.trainer.max_steps > 0


def test_contract_keys_are_overridable():
    cfg = compose("config", overrides=[
        "teacher.pretrained=/x", "teacher.revision=main", "student.lora_rank=8", "student.stochastic_depth=0.1",
        "loss=huber", "loss.huber_c=0.01", "guidance.w_min=3", "guidance.w_max=9", "ema.decay=0.9", "skip.k=10",
        "data.urls='/d/{0..9}.tar'", "data.resolution=32", "optim.lr=3e-5", "optim.weight_decay=0.01",
        "trainer.max_steps=7", "trainer.batch_size=2", "trainer.seed=3", "trainer.mixed_precision=bf16",
        "tracking.uri=http://127.0.0.1:5000", "tracking.experiment=x", "eval.steps=[1,4]"])
    validate(cfg)
    assert (cfg.skip.k, cfg.loss.huber_c, cfg.guidance.w_max, cfg.ema.decay, cfg.trainer.batch_size) == (10, 0.01, 9, 0.9, 2)
    assert list(cfg.eval.steps) == [1, 4]


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as e:
        compose("config", overrides=["loss=l3"])
    assert "l2" in str(e.value) and "huber" in str(e.value)


@pytest.mark.parametrize("override,exc,needle", [
    ("loss.hubr_c=0.1", ConfigCompositionException, "hubr_c"),
    ("skip.k=abc", ConfigCompositionException, "skip.k"),
    ("trainer.max_step=3", ConfigCompositionException, "max_step"),
])
def test_misspelt_key_or_wrong_type_fails_at_composition(override, exc, needle):
    with pytest.raises(exc) as e:
        compose("config", overrides=[override])
    text = str(e.value) + str(e.value.__cause__)
    assert needle in text


@pytest.mark.parametrize("override,needle", [
    (["skip.k=0"], "skip.k"),
    (["guidance.w_min=9", "guidance.w_max=3"], "guidance.w_min"),
    (["ema.decay=1.5"], "ema.decay"),
    (["trainer.mixed_precision=fp8"], "trainer.mixed_precision"),
    (["data.resolution=30"], "data.resolution"),
    (["trainer.attention=flash"], "trainer.attention"),
    (["trainer.overlap_frozen=yes"], "trainer.overlap_frozen"),
])
def test_impossible_values_are_rejected_naming_the_key(override, needle):
    cfg = compose("config", overrides=override)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(cfg)


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
