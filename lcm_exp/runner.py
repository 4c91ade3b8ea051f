"""The generic runner: compose every config group into its component, train, evaluate, return the objective."""
from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .train import checkpoint as ckpt
from .train import ranks, resume
from .config import validate
from .data import stream_of
from .distill.ema import OnlineTarget
from .distill.step import Step
from .train.preemption import Preempted, SignalGuard, under_submitit
from .export.registry import defaults
from .tracking.provenance import run_tags
from .evaluation.validation import Validator

log = logging.getLogger(__name__)


def single_run() -> bool:
    """Whether this is a single run (`lcm-exp ...`), not a job of a multirun sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.RUN


def hydra_dirs() -> tuple[Path, Path]:
    """(start folder, this job's output folder), from Hydra when it runs us, else the working directory."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        rt = HydraConfig.get().runtime
        return Path(rt.cwd), Path(rt.output_dir)
    return Path.cwd(), Path.cwd()


@dataclass
class Parts:
    """The components a run trains with, built from the config groups."""

    teacher: object
    student: object
    ema: object
    step: Step  # the method's step: its networks, parts and loss
    optim: object  # lcm_exp.train.optim.Optimisation
    scheduler: object
    auxiliary: dict  # the method's other trained networks ({name: Auxiliary})
    sampling: object  # how the students sample (the method's; validation, evaluation, export)


def build(cfg: DictConfig, trainer) -> Parts:
    """Every part from its group. The cheap ones first (their values are checked as they are built); the
    student is copied from the teacher's fp32 weights, then the frozen teacher is cast to the mixed-precision
    dtype while every trained parameter stays fp32 (mixed precision computes in bf16/fp16 on fp32 masters)."""
    acc = trainer.accelerator
    method, guidance = instantiate(cfg.method), instantiate(cfg.guidance)
    solver, distance, make_ema = instantiate(cfg.solver), instantiate(cfg.loss), instantiate(cfg.ema)
    skip = instantiate(cfg.skip)
    teacher = instantiate(cfg.teacher)
    student = instantiate(cfg.student, teacher=teacher)
    method.init_student(student)
    auxiliary = method.auxiliary(teacher, student)  # (from the teacher's fp32 weights, before its cast)
    initial = [p.detach().clone() for p in student.trainable_parameters()]
    teacher.to(acc.device, trainer.weight_dtype)
    student.unet.to(acc.device)
    for p, p0 in zip(student.trainable_parameters(), initial):  # (LoRA's adapters sit in the teacher's UNet: the
        p.data = p0.to(acc.device)  # cast above rounded them; they train in fp32 from their fp32 initialisation)
    ema = make_ema(online=student.unet, dtype=trainer.weight_dtype) if student.ema_target else OnlineTarget(student.unet)
    skip = skip.for_teacher(teacher.num_train_timesteps)
    step = Step(student=student.unet, target=ema.target, teacher=student.teacher_unet or teacher.unet,
                schedule=teacher.schedule.to(acc.device), solver=solver, skip=skip, guidance=guidance,
                distance=distance, w_embedding_dim=student.w_embedding_dim, sigma_data=student.sigma_data,
                timestep_scaling=student.timestep_scaling,
                teacher_dtype=trainer.weight_dtype if teacher.cast_to_mixed_precision else torch.float32,
                batched_cfg=trainer.batched_cfg, teacher_first=trainer.teacher_first, method=method)
    optim = instantiate(cfg.optim)(params=student.trainable_parameters())
    sampling = method.sampling(teacher, skip.num_steps, student.timestep_scaling)
    return Parts(teacher, student, ema, step, optim, optim.schedule(trainer.max_steps), auxiliary, sampling)


@dataclass
class Job:
    """What a run holds beside its parts: its folders, trainer, tracker, evaluator and exporter, the checkpoints
    it may resume from, and what every checkpoint records beside the weights (`keep`)."""

    cfg: DictConfig
    start_dir: Path
    out_dir: Path
    trainer: object
    tracker: object
    evaluator: object
    exporter: object
    candidates: list
    keep: dict
    data: object = None  # (the batches, once training starts: a checkpoint records where they are)


def run(cfg: DictConfig) -> float:
    """Distils with the composed config; returns the objective (eval.objective, or the final train loss).
    Raises `Preempted` after a preemption signal (once the state is checkpointed) and a failure's own error (after
    saving the trained state when the failure left it whole); either way the MLflow run ends KILLED/FAILED and the
    last lines printed name the newest checkpoint and the command that resumes it."""
    validate(cfg)
    with SignalGuard() as guard:
        with guard.deferred():  # (a signal while the run is set up: noted, and acted on once it is)
            job = start(cfg)
        status, error = "FAILED", None
        try:
            guard.check()
            parts = build(cfg, job.trainer)
            stream = train(job, parts, guard)
            objective = finish(job, parts, stream)
            status = "FINISHED"
            log.info("run %s finished at step %d; objective %.6g", job.tracker.run_id, job.trainer.global_step,
                     objective)
            return objective
        except BaseException as e:
            error, status = e, "KILLED" if isinstance(e, Preempted) else "FAILED"
            with guard.deferred():  # (a second signal must not cut this save short)
                save_what_is_done(job.trainer, job.data, job.keep)
                if isinstance(e, Preempted):
                    job.tracker.set_tags({"lcm_exp.preempted": "true", "lcm_exp.preempted_by": e.signame,
                                          "lcm_exp.preempted_at_step": str(job.trainer.global_step)})
            raise
        finally:
            with guard.deferred():
                job.tracker.end(status, error=error)
            if error is not None:  # (printed last, by the entry point)
                error.lcm_exp_hint = resume_hint(job.trainer, error, job.start_dir)


def start(cfg: DictConfig) -> Job:
    """The trainer (and with it the processes), the checkpoints to resume from, and the MLflow run: a new one,
    or the resumed run's own. Rank 0 speaks for the run; the other ranks log only what goes wrong."""
    start_dir, out_dir = hydra_dirs()
    trainer = instantiate(cfg.trainer)(job_dir=str(out_dir))
    acc, out_dir = trainer.accelerator, Path(trainer.job_dir)  # (rank 0's folder on every rank)
    if not acc.is_main_process:
        logging.getLogger("lcm_exp").setLevel(logging.WARNING)
    evaluator, exporter = instantiate(cfg.eval)(device=acc.device), instantiate(cfg.export)
    # (a job submitit requeued after a preemption resumes from its own folder by itself); rank 0 chooses for all
    how = trainer.resume or ("job" if under_submitit() else None)
    found = ranks.rank0s(acc, resume.find(how, cfg, start_dir, out_dir, multirun=not single_run())
                         if acc.is_main_process else None)
    found.check(trainer.resume_mismatch, f"trainer.resume={trainer.resume}" if trainer.resume else
                "a requeued job's resume")
    candidates = found.candidates
    resumed = ckpt.read_state(candidates[0]) if candidates else {}
    tracker = instantiate(cfg.tracking, start_dir=str(start_dir))
    tracker.enabled = tracker.enabled and acc.is_main_process
    tags = {**run_tags(), "lcm_exp.output_dir": str(trainer.output_dir.resolve()), **objective_tags(evaluator),
            "lcm_exp.world_size": str(acc.num_processes)}
    tracker.start({**OmegaConf.to_container(cfg, resolve=True), "world_size": acc.num_processes}, tags=tags,
                  run_id=resumed.get("mlflow_run_id"))
    if resumed:  # a continued run keeps its tags; these may have changed
        tracker.set_tags({k: tags[k] for k in ("lcm_exp.output_dir", "lcm_exp.objective", "lcm_exp.world_size",
                                               "lcm_exp.objective_direction")} | {"lcm_exp.preempted": "false"})
    if found.differs:  # (trainer.resume_mismatch=continue)
        tracker.set_tags({"lcm_exp.resumed_with_changes": "; ".join(found.differs)[:5000]})
    log_config(tracker, cfg, out_dir)
    keep = {"config_key": resume.config_key(cfg), "config": resume.trajectory_config(cfg),
            "mlflow_run_id": tracker.run_id}
    return Job(cfg, start_dir, out_dir, trainer, tracker, evaluator, exporter, candidates, keep)


def train(job: Job, parts: Parts, guard: SignalGuard):
    """Prepares the parts, resumes, and trains to `trainer.max_steps` (validating every
    `trainer.validation_every` steps); returns the data stream. With several processes the end of training is
    checkpointed by all of them (a failure after it, on rank 0 alone, could not save it)."""
    trainer, acc, student, ema = job.trainer, job.trainer.accelerator, parts.student, parts.ema
    trainer.prepare(parts.step, student, ema, parts.optim.optimizer, parts.scheduler, parts.auxiliary)
    state = trainer.resume_from(job.candidates)
    data = job.data = instantiate(job.cfg.data)(batch_size=trainer.rank_batch_size, rank=acc.process_index,
                                                world_size=acc.num_processes, teacher=parts.teacher,
                                                state=state.get("data"))
    stream = stream_of(data)
    job.validator = Validator(parts.teacher, student, ema.target, sampling=parts.sampling,
                              resolution=stream.resolution, out_dir=job.out_dir, tracker=job.tracker,
                              steps=job.tracker.validation_steps, prompts=job.tracker.validation_prompts,
                              seed=trainer.seed, w=sampling_w(job, parts), unwrap=trainer.unwrap,
                              dtype=trainer.weight_dtype)

    def on_validate(step: int) -> None:  # (rank 0 validates; under FSDP every rank gathers the weights)
        nets = trainer.networks(student, ema) if trainer.sharded else ()
        if acc.is_main_process:
            job.validator(step, *nets)

    trainer.fit(parts.teacher, data, job.tracker, max_grad_norm=parts.optim.max_grad_norm, guard=guard,
                on_validate=on_validate if acc.is_main_process or trainer.sharded else None, state=job.keep)
    if acc.num_processes > 1 and trainer.saved_step != trainer.global_step:
        with guard.deferred():
            trainer.save_checkpoint(data, job.keep)
    return stream


def finish(job: Job, parts: Parts, stream) -> float:
    """After training, on rank 0: the last validation grid, the trained networks saved, the export, and the
    evaluation; returns the objective (the evaluation's, or the last train loss)."""
    trainer, acc, student = job.trainer, job.trainer.accelerator, parts.student
    online, target = trainer.networks(student, parts.ema)  # (plain, fp32, on rank 0)
    if trainer.sharded:
        acc.wait_for_everyone()  # (every rank's part of the gather done before the others go their way)
    objective = float(trainer.last_stats.get("train/loss", float("nan")))
    if not acc.is_main_process:
        return objective
    if trainer.global_step > 0:  # (validation_every=0: only at the end)
        job.validator(trainer.global_step, *((online, target) if trainer.sharded else ()))
    save_students(trainer, student, online, target, job.tracker)
    w = sampling_w(job, parts)
    job.exporter(parts.teacher, student, online, target, trainer, job.tracker, parts.step.skip.num_steps,
                 parts.sampling, defaults(student, job.evaluator.objective, w, stream.resolution),
                 method=job.cfg.method.get("_target_"))
    if job.evaluator.enabled:
        objective = evaluate_at_end(job.evaluator, parts.teacher, student, online, target, trainer, job.tracker,
                                    stream, w, parts.sampling)
    return objective


def sampling_w(job: Job, parts: Parts) -> float:
    """The guidance w at which validation, evaluation and the export's defaults sample."""
    return parts.step.guidance.mid if job.evaluator.w is None else float(job.evaluator.w)


def save_what_is_done(trainer, data, keep: dict | None) -> None:
    """After a failure or a preemption: a checkpoint of the trained state when there is one to save (training
    has started, it is between two steps, and it is not saved yet). A single process only: with several ranks
    the others may be gone (they checkpoint together at the end of training instead)."""
    if (data is None or not trainer.prepared or not trainer.at_boundary or trainer.global_step == 0
            or trainer.saved_step == trainer.global_step or trainer.accelerator.num_processes > 1):
        return
    try:
        trainer.save_checkpoint(data, keep)
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        log.error("could not checkpoint step %d after the failure: %s: %s", trainer.global_step, type(e).__name__, e)


def resume_hint(trainer, error: BaseException, start_dir: Path) -> str:
    """The last lines of a failed or preempted run: what happened, the newest checkpoint, the resume command."""
    from hydra.core.hydra_config import HydraConfig

    newest = ckpt.listed(trainer.checkpoint_dir)
    if not newest and trainer.global_step == 0:
        return ""  # nothing trained, nothing to resume
    what = (f"preempted by {error.signame} at step {trainer.global_step}" if isinstance(error, Preempted)
            else f"stopped at step {trainer.global_step} by {type(error).__name__}: {error}".splitlines()[0])
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    lines = [f"lcm-exp: {what}"]
    if newest:
        overrides = [o for o in overrides if not o.startswith("trainer.resume=")]
        overrides.append(f"trainer.resume={newest[-1].resolve()}")
        lines += [f"lcm-exp: newest checkpoint: {newest[-1].resolve()}",
                  f"lcm-exp: resume with (from {start_dir}): lcm-exp {' '.join(shlex.quote(o) for o in overrides)}"]
    else:
        lines += ["lcm-exp: no checkpoint was written (set trainer.checkpoint_every=N or "
                  "trainer.checkpoint_every_minutes=M to keep one)"]
    return "\n".join(lines)


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

def objective_tags(evaluator) -> dict[str, str]:
    """What `run()` returns and which way a sweeper should optimise it (psnr_to_ref: maximize)."""
    from .evaluation.evaluator import objective_direction

    name = evaluator.objective if evaluator.enabled else "train/loss"
    return {"lcm_exp.objective": name, "lcm_exp.objective_direction": objective_direction(name)}


def save_students(trainer, student, online, target, tracker) -> None:
    """The final networks in the run folder (`Student.save`: `student_unet/` and `target_unet/`, or the LoRA
    files), plus `lcm_exp_run.json` (MLflow run id, tracking URI, step) for `lcm-exp-eval dir=...`."""
    out = trainer.output_dir
    student.save(out, online, target)
    (out / "lcm_exp_run.json").write_text(json.dumps(
        {"mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri, "step": trainer.global_step}, indent=2))


def evaluate_at_end(evaluator, teacher, student, online, target, trainer, tracker, stream, w: float,
                    sampling) -> float:
    """The evaluation of the trained student (`lcm_exp.evaluation.evaluator`); returns `eval.objective`."""
    from .evaluation.evaluator import evaluate_run

    net = target if evaluator.model == "target" else online
    net = student.inference_unet(net)  # a plain UNet (LoRA: merged into a copy)
    student.teacher_again()  # from here on teacher.unet is the plain teacher (the evaluation's baselines)
    metrics = evaluate_run(evaluator, teacher, net, stream.eval_source, tracker, trainer.output_dir,
                           step=trainer.global_step, w=w, resolution=stream.resolution, sampling=sampling)
    if evaluator.objective not in metrics:
        log.error("eval.objective=%s was not computed (have: %s); returning nan", evaluator.objective,
                  ", ".join(sorted(metrics)))
        return float("nan")
    return float(metrics[evaluator.objective])
