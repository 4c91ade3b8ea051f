"""`lcm-exp-launch [torchrun options] [overrides]`: `torchrun -m lcm_exp` with what a preemptible cluster job needs.

torchrun's agent forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to the workers, waits `--shutdown_timeout`
seconds (30 by default), kills what is left, and exits 1 whatever the workers did; SIGUSR1 and SIGUSR2 (what
SLURM's `--signal=USR1@90` and submitit send) kill the agent itself. This runs torchrun's own `main` with
  - `--signals_to_handle` extended to SIGUSR1 and SIGUSR2, so that they reach every worker too,
  - `--shutdown_timeout` 120 s (`LCM_EXP_GRACE_S`), time for every rank to finish its step and checkpoint,
and exits with the workers' status: 75 (EXIT_PREEMPTED) when every worker stopped for a preemption signal
after its checkpoint, 2 when they stopped on a configuration error, 0 when the run finished, else 1. Each
worker writes its exit status into a folder the launcher names (`LCM_EXP_EXIT_DIR`), which is how the status
crosses the agent. Options given here win over these defaults; everything that is not a torchrun option is an
lcm-exp override.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

EXIT_DIR_ENV = "LCM_EXP_EXIT_DIR"
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, lcm-exp overrides): an argument is an override when it is not an option and not the
    value of the option before it (`--nproc_per_node 2`)."""
    from torch.distributed.run import get_args_parser

    takes_value = {s for a in get_args_parser()._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}
    options, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and "=" not in arg and arg in takes_value and i + 1 < len(argv):
            options += [arg, argv[i + 1]]
            i += 2
            continue
        (options if arg.startswith("-") else overrides).append(arg)
        i += 1
    return options, overrides


def worker_exit(code: int) -> None:
    """In a worker started by this launcher: its exit status, for the launcher to read."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder:
        Path(folder, os.environ.get("RANK", "0")).write_text(str(code))


def status(folder: Path, torchrun_ok: bool) -> int:
    codes = [int(p.read_text() or 1) for p in folder.iterdir()]
    if torchrun_ok and all(c == 0 for c in codes):
        return 0
    from .train.preemption import EXIT_PREEMPTED

    for code in (EXIT_PREEMPTED, 2):
        if codes and all(c == code for c in codes if c != 0):
            return code
    return 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import main as torchrun

    options, overrides = split(list(sys.argv[1:] if argv is None else argv))
    given = {o.split("=")[0] for o in options if o.startswith("--")}
    if "--signals_to_handle" not in given:
        options.append(f"--signals_to_handle={SIGNALS}")
    if "--shutdown_timeout" not in given:
        options.append(f"--shutdown_timeout={int(os.environ.get('LCM_EXP_GRACE_S', '120'))}")
    with tempfile.TemporaryDirectory(prefix="lcm-exp-launch-") as folder:
        os.environ[EXIT_DIR_ENV] = folder
        ok = False
        try:
            torchrun([*options, "-m", "lcm_exp", *overrides])
            ok = True
        except SystemExit as e:
            ok = not e.code
        except BaseException as e:  # noqa: BLE001 - the agent's SignalException, a worker's failure: sorted below
            print(f"lcm-exp-launch: torchrun stopped: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                  file=sys.stderr)
        code = status(Path(folder), ok)
    print(f"lcm-exp-launch: exit {code}", file=sys.stderr)
    return code


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
