"""`lcm-exp-eval`: find a finished run (MLflow run id or output folder), rebuild its teacher and student
from its composed config, evaluate, and log to that same run."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
RUN_FILE = "lcm_exp_run.json"


def resolve(cli: DictConfig) -> tuple[Path, str | None, str]:
    """(run output folder, MLflow run id, tracking URI) from `dir=` and/or `run=`."""
    from ..tracking.tracker import default_uri

    if not cli.dir and not cli.run:
        raise SystemExit("lcm-exp-eval: give run=<mlflow run id> or dir=<run output folder>")
    if cli.dir:
        out = Path(cli.dir).expanduser().resolve()
        info = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {}
        return out, cli.run or info.get("mlflow_run_id"), cli.tracking.uri or info.get("tracking_uri") or default_uri()
    from mlflow.tracking import MlflowClient

    uri = cli.tracking.uri or default_uri()
    tags = MlflowClient(uri).get_run(cli.run).data.tags
    if "lcm_exp.output_dir" not in tags:
        raise SystemExit(f"lcm-exp-eval: run {cli.run} in {uri} has no tag lcm_exp.output_dir; use dir=<run folder>")
    return Path(tags["lcm_exp.output_dir"]), cli.run, uri


def run_config(out: Path) -> DictConfig:
    """The run's composed config: `.hydra/config.yaml` in the output folder or one of its parents."""
    from ..config import stored

    for folder in (out, *list(out.parents)[:3]):
        if (folder / ".hydra" / "config.yaml").exists():
            return stored(OmegaConf.load(folder / ".hydra" / "config.yaml"))
    raise SystemExit(f"lcm-exp-eval: no .hydra/config.yaml in {out} (or its parents)")


def eval_overrides() -> list[str]:
    """The `eval.*` keys overridden on this command line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(task)]
    return [k.lstrip("+~") for k in keys if k.lstrip("+~").startswith("eval.")]


def main(cli: DictConfig) -> dict[str, float]:
    from hydra.utils import instantiate

    from ..data import stream_of
    from .evaluator import evaluate_run

    out, run_id, uri = resolve(cli)
    cfg = run_config(out)
    for key in eval_overrides():
        OmegaConf.update(cfg, key, OmegaConf.select(cli, key), force_add=True)
    device = torch.device(cli.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    evaluator = instantiate(cfg.eval)(device=device)
    teacher = instantiate(cfg.teacher)
    student = instantiate(cfg.student, teacher=teacher)
    if not student.saved(out):
        raise SystemExit(f"lcm-exp-eval: {out} holds no trained student (written at the end of a finished lcm-exp run)")
    target = copy.deepcopy(student.unet) if student.ema_target else student.unet
    student.load(out, student.unet, target)
    net = student.inference_unet(target if evaluator.model == "target" else student.unet)
    student.teacher_again()
    teacher.to(device)
    skip = instantiate(cfg.skip).for_teacher(teacher.num_train_timesteps)
    stream = stream_of(instantiate(cfg.data)(batch_size=1, teacher=teacher))
    w = instantiate(cfg.guidance).mid
    tracker = instantiate(cli.tracking, uri=uri, experiment=cfg.tracking.get("experiment", "lcm-distill"),
                          enabled=bool(run_id), system_metrics=False)
    if not run_id:
        log.warning("no MLflow run recorded for %s: metrics are only written to %s/eval", out, out)
    tracker.start({}, run_id=run_id)
    status = "FAILED"
    try:
        step = json.loads((out / RUN_FILE).read_text()).get("step", 0) if (out / RUN_FILE).exists() else 0
        sampling = instantiate(cfg.method).sampling(teacher, skip.num_steps, student.timestep_scaling)
        metrics = evaluate_run(evaluator, teacher, net.to(device), stream.eval_source, tracker, out, step=step, w=w,
                               resolution=stream.resolution, sampling=sampling)
        status = "FINISHED"
    finally:
        tracker.end(status)
    print(out / "eval", flush=True)
    return metrics
