"""Which params a run logs and what it is called (issue 18, item 1), without training: the applicability rule,
group options as params from a real Hydra composition, run names from overrides, the report's attribution and
the headline eval metrics."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from lcm_exp.tracking.applicability import not_applicable, option_keys, option_name  # noqa: E402
from lcm_exp.tracking.names import fixed_overrides, name_from_overrides  # noqa: E402


# --------------------------------------------------------------------------------------------- applicability
def test_keys_of_other_options_do_not_apply():
    flat = {"loss._target_": "lcm_exp.distill.losses.l2", "loss._partial_": "True", "loss.huber_c": "0.001",
            "student._target_": "lcm_exp.students.full", "student.lora_rank": "64", "student.lora_alpha": "64",
            "student.ema_target": "True", "student.time_cond_proj_dim": "256", "skip.k": "20", "method.name": "lcd"}
    assert not_applicable(flat) == {"loss.huber_c", "student.lora_rank", "student.lora_alpha", "student.ema_target"}
    huber = {**flat, "loss._target_": "lcm_exp.distill.losses.huber"}
    assert "loss.huber_c" not in not_applicable(huber)
    lora = {**flat, "student._target_": "lcm_exp.students.lora"}
    assert {"student.time_cond_proj_dim"} <= not_applicable(lora)
    assert not {"student.lora_rank", "student.ema_target"} & not_applicable(lora)


def test_a_teachers_keys_follow_its_loader():
    sd15 = {"teacher._target_": "lcm_exp.teachers.load_teacher", "teacher.name": "sd15", "teacher.arch": "{}",
            "teacher.pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5", "teacher.cache_dir": "~/.cache"}
    assert not_applicable(sd15) == {"teacher.arch", "teacher.cache_dir"}
    # a loader with **kw may pass any key on: all apply
    tiny = {**sd15, "teacher._target_": "lcm_exp.teachers.tiny.load"}
    assert not_applicable(tiny) == set()


def test_option_yaml_and_its_defaults_count(tmp_path):
    # adamw8bit.yaml pulls in adamw.yaml: the runner's keys there (lr_scheduler, max_grad_norm) apply
    keys = option_keys("optim", "lcm_exp.train.optim.adamw8bit", "adamw8bit")
    assert {"lr", "lr_scheduler", "lr_warmup_steps", "max_grad_norm"} <= keys


def test_a_users_own_target_keeps_every_key():
    flat = {"loss._target_": "my_project.losses.fancy", "loss.huber_c": "0.1", "loss.extra": "1"}
    assert not_applicable(flat) == set()
    assert option_name("loss", "my_project.losses.fancy") == "fancy"


def test_option_name_follows_the_target_not_hydras_default_choice():
    # a sweep over dict values (`loss={_target_:lcm_exp.distill.losses.l2}`) leaves Hydra's choice at the default
    assert option_name("loss", "lcm_exp.distill.losses.l2", "huber") == "l2"
    assert option_name("loss", "lcm_exp.distill.losses.huber", "huber") == "huber"
    assert option_name("method", None, "ct") == "ct"


# --------------------------------------------------------------------------------------------- run names
@pytest.mark.parametrize("overrides, fixed, name", [
    ([], [], "default"),
    (["loss=l2", "skip.k=10"], [], "loss=l2 skip.k=10"),
    (["skip.k=10", "experiment=smoke", "teacher.cache_dir=/tmp/c", "tracking.uri=http://u:p@h:5000"], [],
     "smoke skip.k=10"),
    (["+sweep=loss", "experiment=smoke", "loss={_target_:lcm_exp.distill.losses.huber,huber_c:0.01}"],
     ["+sweep=loss", "experiment=smoke"], "loss=huber loss.huber_c=0.01"),
    (["loss={_target_:lcm_exp.distill.losses.l2}", "optim.lr=0.000123456", "hydra/launcher=joblib", "export.enabled=false",
      "trainer.cpu=true"], [], "loss=l2 optim.lr=0.0001235 trainer.cpu=true"),
    (["teacher=sd15", "teacher.pretrained=/models/stable-diffusion-v1-5/"], [],
     "teacher=sd15 teacher.pretrained=stable-diffusion-v1-5"),
    (["teacher.pretrained=org/model", "eval.objective=eval/student_2step/psnr_to_ref"], [],
     "teacher.pretrained=org/model eval.objective=eval/student_2step/psnr_to_ref"),
])
def test_names_from_overrides(overrides, fixed, name):
    assert name_from_overrides(overrides, fixed) == name


def test_the_overrides_a_sweep_shares():
    line = ["experiment=smoke", "loss=l2,huber", "skip.k=range(5,20,5)", "+sweep=skip_k", "optim.lr=1e-4"]
    assert fixed_overrides(line) == ["experiment=smoke", "+sweep=skip_k", "optim.lr=1e-4"]


# ------------------------------------------------------------------------------- params of a composed run
def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from lcm_exp.cli import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=False)
    resolved.pop("hydra")
    return resolved


@pytest.fixture
def hydra_reset():
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None


def test_run_params_full_student_l2(hydra_reset):
    from lcm_exp.tracking.tracker import run_params

    params, dropped = run_params(compose(["loss=l2", "solver=heun", "experiment=smoke"]))
    assert {k: params[k] for k in ("loss", "solver", "teacher", "student", "optim", "experiment")} == \
        {"loss": "l2", "solver": "heun", "teacher": "tiny_random", "student": "full", "optim": "adamw",
         "experiment": "smoke"}
    assert params["loss._target_"] == "lcm_exp.distill.losses.l2" and params["skip.k"] == "20"  # dotted keys stay
    assert "loss.huber_c" not in params and "student.lora_rank" not in params
    assert not dropped  # (each option carries its own keys only: nothing foreign to drop)
    assert not any(k.startswith("hydra") for k in params)


def test_run_params_lora_student_huber(hydra_reset):
    from lcm_exp.tracking.tracker import run_params

    params, dropped = run_params(compose(["student=lora", "loss.huber_c=0.01"]))
    assert params["student"] == "lora" and params["loss"] == "huber" and params["loss.huber_c"] == "0.01"
    assert params["student.lora_rank"] == "64" and "student.time_cond_proj_dim" not in params


def test_a_dict_override_names_its_option(hydra_reset):
    from lcm_exp.tracking.tracker import run_params

    params, _ = run_params(compose(["loss={_target_:lcm_exp.distill.losses.l2}"]))
    assert params["loss"] == "l2" and "loss.huber_c" not in params


# ------------------------------------------------------------------------------------------------ report
def run(name, **params):
    return SimpleNamespace(info=SimpleNamespace(run_name=name, run_id=name, status="FINISHED"),
                           data=SimpleNamespace(params=params, metrics={"eval/student_4step/psnr_to_ref": 20.0},
                                                tags={}))


def test_report_never_attributes_what_does_not_apply(tmp_path):
    from lcm_exp.evaluation import report

    # an l2 run logged before params were filtered still carries huber_c: it is judged the same way
    old_l2 = run("a", **{"loss._target_": "lcm_exp.distill.losses.l2", "loss.huber_c": "0.001", "skip.k": "20"})
    h1 = run("b", **{"loss._target_": "lcm_exp.distill.losses.huber", "loss": "huber", "loss.huber_c": "0.01", "skip.k": "20"})
    h2 = run("c", **{"loss._target_": "lcm_exp.distill.losses.huber", "loss": "huber", "loss.huber_c": "0.1", "skip.k": "20"})
    runs = [old_l2, h1, h2]
    params = report.swept_params(runs)
    assert params == ["loss", "loss.huber_c"]
    assert report.label(old_l2, params) == "loss=l2"
    assert report.label(h1, params) == "loss=huber, loss.huber_c=0.01"
    rows = report.write_table(runs, params, ["eval/student_4step/psnr_to_ref"], "eval/student_4step/psnr_to_ref",
                              "maximize", tmp_path, "t")
    assert [(r["loss"], r["loss.huber_c"]) for r in rows] == [("l2", "n/a"), ("huber", "0.01"), ("huber", "0.1")]
    assert "0.001" not in (tmp_path / "table.md").read_text() and "0.001" not in (tmp_path / "table.csv").read_text()


# ------------------------------------------------------------------------------------------ the UI's view
def test_ui_view_columns_and_their_accumulation(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from lcm_exp.tracking.view import TAG, columns, share, sweep_keys

    assert {"skip.k", "loss.huber_c", "optim.lr", "ema.decay"} <= set(sweep_keys())
    config = {"eval": {"enabled": True, "steps": [1, 4], "objective": "eval/student_4step/psnr_to_ref"}}
    params = {"loss": "l2", "student": "full", "tracking": "mlflow", "skip.k": "20", "optim.lr": "1e-4"}
    cols = columns(config, params)
    assert cols[:3] == ["metrics.`compare/psnr_to_ref/student_1step`", "metrics.`compare/psnr_to_ref/student_4step`",
                        "metrics.`compare/psnr_to_ref/teacher_ddim_4step`"]
    assert {"params.`loss`", "params.`student`", "params.`skip.k`", "params.`optim.lr`"} <= set(cols)
    assert "params.`tracking`" not in cols  # a group with one option says nothing
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x")
    share(client, exp, {"eval": {"enabled": False}}, {"loss": "l2"})
    share(client, exp, config, params)
    view = json.loads(client.get_experiment(exp).tags[TAG])["selectedColumns"]
    assert view[:2] == ["metrics.`train/loss`", "params.`loss`"] and set(cols) <= set(view)


# ------------------------------------------------------------------------------------------ headline metrics
def test_headline_metrics_sort_first_and_copy_the_objectives_family():
    from lcm_exp.evaluation.evaluator import headline_metrics

    metrics = {f"eval/{m}_{n}step/{f}": float(n) + (10 if m == "student" else 0)
               for m in ("student", "teacher_ddim", "teacher_dpmpp") for n in (1, 2, 4)
               for f in ("psnr_to_ref", "mse_to_ref")}
    head = headline_metrics(metrics, "eval/student_4step/psnr_to_ref", [1, 2, 4])
    assert head == {f"compare/psnr_to_ref/{m}_{n}step": metrics[f"eval/{m}_{n}step/psnr_to_ref"]
                    for m in ("student", "teacher_ddim") for n in (1, 2, 4)}
    everything = sorted([*metrics, *head, "train/loss", "data/skipped", "system/cpu_utilization_percentage"])
    assert everything[:6] == sorted(head)  # MLflow's UI sorts metric names: these come first
