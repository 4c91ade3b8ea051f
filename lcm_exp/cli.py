"""Entry points: compose the config with Hydra, call the runner, return its metric. Nothing else."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


from .config import config_dir, sweeps_dir  # noqa: E402,F401  (tests and users import them from here)


def register_sweeps() -> None:
    """Every `sweeps/NAME.yaml` as the option NAME of the config group `sweep` (package `_global_`), so that
    `lcm-exp +sweep=NAME` selects it; each file sets `hydra.mode: MULTIRUN` and `hydra.sweeper.params`."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    for path in sorted(sweeps_dir().glob("*.yaml")):
        ConfigStore.instance().store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_")


def _main(config_name: str, task, config_path: str | None = None):
    import hydra

    if config_name == "config":
        register_sweeps()
    code = 1
    try:
        result = hydra.main(version_base="1.3", config_path=config_path or config_dir(), config_name=config_name)(task)()
        code = 0
        return result
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:
        _end_processes()
        from .launch import worker_exit

        worker_exit(code)  # (under lcm-exp-launch: the status it exits with)


def _end_processes() -> None:
    """Several processes: each ends its torch.distributed process group before the interpreter exits (left to
    the exit, gloo's teardown could abort a rank that finished first, with "terminate called without an active
    exception", and its launcher then stopped the others)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(cfg):
    """Runs the job. Exit codes: 0 done; 2 a configuration error (its message, no traceback); EXIT_PREEMPTED
    after a preemption signal, once checkpointed (under submitit: requeued instead); 1 any other failure, whose
    traceback comes first and the newest checkpoint and the resume command last. In a multirun a failed job's
    error goes back to Hydra, which runs the other jobs and reports it."""
    import traceback

    from .train.preemption import EXIT_PREEMPTED, Preempted, requeue_with_submitit, under_submitit
    from .runner import run

    def hint(e):
        if getattr(e, "lcm_exp_hint", None):
            print(e.lcm_exp_hint, file=sys.stderr, flush=True)

    try:
        return run(cfg)
    except Preempted as e:
        hint(e)
        if under_submitit():
            requeue_with_submitit()
        raise SystemExit(EXIT_PREEMPTED) from None
    except Exception as e:  # noqa: BLE001 - sorted here
        config_error = _config_error(e)
        if config_error is not None:  # a user's value that cannot work: the message says what to do
            print(f"lcm-exp: {config_error}", file=sys.stderr)
            hint(e)
            if _single_run():
                raise SystemExit(2) from None
            raise  # a sweep's job: Hydra records it as failed and runs the others
        if not _single_run():
            hint(e)
            raise
        traceback.print_exc()
        hint(e)
        raise SystemExit(1) from None


def _config_error(e: BaseException | None):
    """The ConfigError behind `e` (Hydra's instantiate wraps what a _target_ raises), or None."""
    from .config import ConfigError

    while e is not None:
        if isinstance(e, ConfigError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _single_run() -> bool:
    from .runner import single_run

    return single_run()


def train():
    """`lcm-exp [overrides]`: the main job."""
    return _main("config", _train)


def _evaluate(cfg):
    from .evaluation.job import main

    main(cfg)


def evaluate():
    """`lcm-exp-eval run=<mlflow run id> | dir=<run output folder> [eval.* overrides]`."""
    return _main("eval_cli", _evaluate)


def _report(cfg):
    from .evaluation.report import main

    main(cfg)


def report():
    """`lcm-exp-report parent=<sweep parent run id> | experiment=NAME [filter="..."]`: table and plots."""
    return _main("report_cli", _report, config_path=str(Path(config_dir()) / "report"))


def _bench(cfg):
    from .bench.measure import report, run_bench
    from .config import validate

    validate(cfg)
    print(report(run_bench(cfg)), flush=True)  # the last line is one JSON object


def bench():
    """`lcm-exp-bench [overrides]`: our training step against the reference step, side by side."""
    return _main("bench", _bench)


def _precompute(cfg):
    from hydra.utils import instantiate

    from .data.cached import precompute

    teacher = instantiate(cfg.teacher)
    p = cfg.precompute
    batches = instantiate(cfg.data)(batch_size=p.batch_size, resampled=False, shuffle_buffer=0, endless=False)
    urls = precompute(teacher, batches, p.out, p.num_samples, p.samples_per_shard)
    print(f"train from them with: lcm-exp data=cached data.urls='{urls[0].rsplit('-', 1)[0]}-{{00000..{len(urls) - 1:05d}}}.tar'")


def precompute():
    """`lcm-exp-precompute precompute.out=DIR [data=webdataset data.urls=...] [teacher=...]`: latents and text
    embeddings computed once, for `data=cached`."""
    return _main("precompute", _precompute)


def _export(cfg):
    from .export.exporter import export_checkpoint

    if not cfg.checkpoint:
        raise SystemExit("lcm-exp-export: give checkpoint=<checkpoint-<step> folder or run output folder>")
    export_checkpoint(cfg.checkpoint, out=cfg.out, model=cfg.model, device=cfg.device or "cpu")


def export():
    """`lcm-exp-export checkpoint=<checkpoint folder | run folder> [out=DIR] [model=target|online]`."""
    return _main("export_cli", _export)


def build_teacher():
    """`lcm-exp-build-teacher [--out DIR] [--force] [overrides]`: build, measure and cache the tiny teacher."""
    from .teachers.tiny import main

    main()
