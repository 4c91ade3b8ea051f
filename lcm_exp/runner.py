"""The generic runner: compose every config group into its component, train, evaluate, return the objective."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, validate
from .ema import OnlineTarget
from .lcd import LCD
from .optim import lr_schedule
from .tracking import run_tags
from .validation import Validator

log = logging.getLogger(__name__)
# Keys that do not change what is trained: a checkpoint of the same config with other values of these resumes.
RESUME_IGNORES = ("trainer.resume", "trainer.max_steps", "trainer.checkpoint_every", "trainer.checkpoints_total_limit",
                  "trainer.log_every", "trainer.validation_every", "trainer.output_dir", "tracking", "eval")


def hydra_dirs() -> tuple[Path, Path]:
    """(start folder, this job's output folder), from Hydra when it runs us, else the working directory."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        rt = HydraConfig.get().runtime
        return Path(rt.cwd), Path(rt.output_dir)
    return Path.cwd(), Path.cwd()


def config_key(cfg: DictConfig) -> str:
    """A hash of what determines the training trajectory, to match checkpoints for `trainer.resume=latest`."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for dotted in RESUME_IGNORES:
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_checkpoint(resume: str | None, key: str, start_dir: Path, out_dir: Path) -> Path | None:
    """`latest`: the newest checkpoint of this same configuration among this start folder's runs
    (outputs/ and multirun/, or this job's folder); else a given checkpoint folder."""
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"trainer.resume={resume}: no checkpoint there (no trainer_state.json). Give a "
                              "checkpoint-<step> folder or trainer.resume=latest.")
        return path
    roots = {out_dir, start_dir / "outputs", start_dir / "multirun"}
    found = []
    for root in roots:
        for state in root.glob("**/checkpoints/checkpoint-*/trainer_state.json"):
            try:
                meta = json.loads(state.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("config_key") == key:
                found.append((meta["step"], state.stat().st_mtime, state.parent))
    if not found:
        log.warning("trainer.resume=latest: no checkpoint of this configuration under %s; starting from step 0",
                    start_dir)
        return None
    return max(found)[2]


def run(cfg: DictConfig) -> float:
    """Distils with the composed config; returns the objective (eval.objective, or the final train loss)."""
    validate(cfg)
    start_dir, out_dir = hydra_dirs()
    trainer = instantiate(cfg.trainer)(output_dir=str(out_dir / cfg.trainer.output_dir))
    acc = trainer.accelerator
    key = config_key(cfg)
    resume_from = find_checkpoint(cfg.trainer.resume, key, start_dir, out_dir)
    resumed_state = json.loads((resume_from / "trainer_state.json").read_text()) if resume_from else {}

    tracker = instantiate(cfg.tracking, start_dir=str(start_dir))
    if not acc.is_main_process:
        tracker.enabled = False
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tags = {**run_tags(), "lcm_exp.output_dir": str(trainer.output_dir.resolve()), **objective_tags(cfg)}
    tracker.start(resolved, tags=tags, run_id=resumed_state.get("mlflow_run_id"))
    if resumed_state:  # a continued run keeps its tags; these may have changed
        tracker.set_tags({k: tags[k] for k in ("lcm_exp.output_dir", "lcm_exp.objective", "lcm_exp.objective_direction")})
    log_config(tracker, cfg, out_dir)
    status, error = "FAILED", None
    try:
        teacher = instantiate(cfg.teacher).to(acc.device, trainer.weight_dtype)
        student = instantiate(cfg.student, teacher=teacher)
        if cfg.method.from_scratch:  # consistency training from scratch: a randomly initialised student
            reinitialise(student.unet)
        student.unet.to(acc.device)
        ema = (instantiate(cfg.ema)(online=student.unet, dtype=trainer.weight_dtype) if student.ema_target
               else OnlineTarget(student.unet))
        lcd = LCD(student=student.unet, target=ema.target, teacher=student.teacher_unet or teacher.unet,
                  method=cfg.method.name,
                  alphas_cumprod=teacher.scheduler.alphas_cumprod.to(acc.device), prediction_type=teacher.prediction_type,
                  solver=instantiate(cfg.solver), skip=instantiate(cfg.skip)(num_train_timesteps=teacher.num_train_timesteps),
                  guidance=instantiate(cfg.guidance), distance=instantiate(cfg.loss),
                  w_embedding_dim=student.w_embedding_dim, sigma_data=student.sigma_data,
                  timestep_scaling=student.timestep_scaling,
                  teacher_dtype=trainer.weight_dtype if teacher.cast_to_mixed_precision else torch.float32,
                  batched_cfg=cfg.trainer.batched_cfg, teacher_first=cfg.trainer.teacher_first)
        optimizer = instantiate(cfg.optim)(params=student.trainable_parameters())
        n = acc.num_processes  # accelerate steps a prepared scheduler once per process
        scheduler = lr_schedule(optimizer, cfg.optim.lr_scheduler, cfg.optim.lr_warmup_steps * n, cfg.trainer.max_steps * n)
        data = instantiate(cfg.data)(batch_size=cfg.trainer.batch_size, rank=acc.process_index,
                                     world_size=acc.num_processes, teacher=teacher)
        validator = Validator(teacher, student.unet, ema.target, skip_k=cfg.skip.k,
                              timestep_scaling=student.timestep_scaling, resolution=cfg.data.resolution,
                              out_dir=out_dir, tracker=tracker, steps=tracker.validation_steps,
                              prompts=tracker.validation_prompts, seed=cfg.trainer.seed,
                              w=(cfg.guidance.w_min + cfg.guidance.w_max) / 2, unwrap=trainer.unwrap)
        on_validate = validator if acc.is_main_process else None
        stats = trainer.fit(lcd, teacher, student, ema, optimizer, scheduler, data, tracker,
                            max_grad_norm=cfg.optim.max_grad_norm, resume_from=resume_from, on_validate=on_validate,
                            ckpt_extra={"config_key": key, "mlflow_run_id": tracker.run_id})
        if on_validate and trainer.global_step > 0:
            validator(trainer.global_step)  # validation_every=0: only at the end; else the final step too
        objective = float(stats.get("train/loss", float("nan")))
        if acc.is_main_process:
            save_students(trainer, student, ema, tracker)
            if cfg.export.enabled:
                export_at_end(cfg, teacher, student, ema, trainer, tracker)
            if cfg.eval.enabled:
                objective = evaluate_at_end(cfg, teacher, student, ema, trainer, tracker)
        status = "FINISHED"
        log.info("run %s finished at step %d; objective %.6g", tracker.run_id, trainer.global_step, objective)
        return objective
    except BaseException as e:
        error = e
        raise
    finally:
        tracker.end(status, error=error)


def log_config(tracker, cfg: DictConfig, out_dir: Path) -> None:
    """Artifacts: the resolved config (yaml) and Hydra's `.hydra/` folder of this job."""
    if tracker.run_id is None:
        return
    path = out_dir / "resolved_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(path, "config")
    hydra_dir = out_dir / ".hydra"
    if hydra_dir.is_dir():
        tracker.log_artifact(hydra_dir, "config/.hydra")

def objective_tags(cfg: DictConfig) -> dict[str, str]:
    """What `run()` returns and which way a sweeper should optimise it (psnr_to_ref: maximize)."""
    from .evaluation import objective_direction

    name = cfg.eval.objective if cfg.eval.enabled else "train/loss"
    return {"lcm_exp.objective": name, "lcm_exp.objective_direction": objective_direction(name)}


def reinitialise(unet: torch.nn.Module) -> None:
    """Random weights of the same architecture (diffusers' initialisation), in place."""
    from diffusers import UNet2DConditionModel

    unet.load_state_dict(UNet2DConditionModel.from_config(unet.config).state_dict())


def save_students(trainer, student, ema, tracker) -> None:
    """`student_unet/` (online) and `target_unet/` (EMA) in the run folder, loadable with `from_pretrained`
    (for LoRA: `student_lora/` and, with an EMA, `target_lora/`, each a pytorch_lora_weights.safetensors),
    plus `lcm_exp_run.json` (MLflow run id, tracking URI, step) for `lcm-exp-eval dir=...`."""
    out = trainer.output_dir
    if student.kind == "lora":
        from diffusers import StableDiffusionPipeline  # the same LoRA file format for SD and SDXL

        from .students import lora_state_dict

        nets = {"student_lora": trainer.unwrap(student.unet)}
        if student.ema_target:
            nets["target_lora"] = ema.target
        for sub, net in nets.items():
            StableDiffusionPipeline.save_lora_weights(out / sub, unet_lora_layers=lora_state_dict(net))
    else:
        trainer.unwrap(student.unet).save_pretrained(out / "student_unet")
        ema.target.save_pretrained(out / "target_unet")
    (out / "lcm_exp_run.json").write_text(json.dumps(
        {"mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri, "step": trainer.global_step}, indent=2))


def export_at_end(cfg: DictConfig, teacher, student, ema, trainer, tracker) -> None:
    """The diffusers export (`export.py`) of the trained student, logged as the MLflow artifact `model`."""
    from .export import export

    unet = ema.target if cfg.export.model == "target" else trainer.unwrap(student.unet)
    folder = export(teacher, student, unet, trainer.output_dir / cfg.export.dir, k=int(cfg.skip.k),
                    step=trainer.global_step)
    tracker.log_artifact(folder, "model")
    log.info("exported the %s student (%s) to %s (MLflow artifact `model`)", student.kind, cfg.export.model, folder)
    print(f"lcm-exp: exported model: {folder.resolve()}", flush=True)
    from .registry import register  # export.register=NAME: a pyfunc version in the MLflow Model Registry

    register(cfg, folder, teacher, student, tracker)


def evaluate_at_end(cfg: DictConfig, teacher, student, ema, trainer, tracker) -> float:
    """The evaluation of issue 4 on the trained student; returns `cfg.eval.objective`."""
    from .evaluation import evaluate_run

    unet = ema.target if cfg.eval.model == "target" else trainer.unwrap(student.unet)
    unet = student.inference_unet(unet)  # LoRA: merged into a plain UNet copy
    if student.kind == "lora":  # from here on teacher.unet is the teacher again (eval's baselines)
        trainer.unwrap(student.unet).disable_adapters()
    metrics = evaluate_run(cfg, teacher, unet, tracker, trainer.output_dir, step=trainer.global_step,
                           device=trainer.accelerator.device)
    if cfg.eval.objective not in metrics:
        log.error("eval.objective=%s was not computed (have: %s); returning nan", cfg.eval.objective,
                  ", ".join(sorted(metrics)))
        return float("nan")
    return float(metrics[cfg.eval.objective])
