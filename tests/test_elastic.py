"""Scale without surprises (issue 26), end to end on two CPU ranks:

- a run checkpointed on 2 ranks resumes exactly on 1, and one of 1 on 2 (the data lanes, the per-sample draws
  and the lr schedule do not depend on the world size): every loss and every weight as the uninterrupted run's,
  to the tolerance of 2 ranks against 1;
- SIGTERM and SIGUSR1 sent to the launcher's own process (`lcm-exp-launch`, torchrun's agent) reach every rank,
  which checkpoints the same step; the launcher exits 75, the MLflow run is KILLED and tagged, and the resume
  logs the uninterrupted run's losses;
- plain torchrun forwards SIGTERM too (and exits 1: it does not pass the workers' status on)."""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import ENV, TINY, assert_every_weight_close, final_weights, lcm_exp, only_run
from test_scale_out import RTOL, losses, torchrun

pytestmark = pytest.mark.slow
RUN = [*TINY, "trainer.batch_size=4", "trainer.gradient_accumulation_steps=2", "trainer.max_steps=6",
       "optim.lr_scheduler=linear", "optim.lr_warmup_steps=3", "trainer.checkpoint_every=3"]
LAUNCH = [sys.executable, "-c", "from lcm_exp.launch import cli; cli()", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("one")
    lcm_exp(RUN, cwd)
    return losses(cwd), final_weights(cwd)


def resumed_run(cwd) -> dict[int, float]:
    """{step: loss} of the store's only run, a step logged twice (re-run after the resume) by its last value."""
    _, run = only_run(cwd)
    client, _ = only_run(cwd)
    return {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                            key=lambda m: m.timestamp)}


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)], ids=["2_ranks_then_1", "1_rank_then_2"])
def test_a_checkpoint_resumes_exactly_on_another_world_size(tmp_path, uninterrupted, first, then):
    def run(ranks, args):
        return torchrun(args, tmp_path) if ranks == 2 else lcm_exp(args, tmp_path)

    run(first, [*RUN, "trainer.max_steps=3"])
    r = run(then, [*RUN, "trainer.resume=latest"])
    assert "at step 3" in r.stdout + r.stderr and f"written by {first} processes" in r.stdout + r.stderr
    ref_losses, ref_weights = uninterrupted
    got = resumed_run(tmp_path)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert math.isclose(got[step], ref_losses[step], rel_tol=RTOL), (step, got[step], ref_losses[step])
    assert_every_weight_close(final_weights(tmp_path), ref_weights)
    _, mlflow_run = only_run(tmp_path)
    assert mlflow_run.data.tags["lcm_exp.world_size"] == str(then)


def launch_and_signal(args, cwd, sig, step: int = 2):
    """`lcm-exp-launch` (2 ranks) with `args`; `sig` to the launcher's own process once step `step` is logged;
    returns (exit code, output)."""
    p = subprocess.Popen([*LAUNCH, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    lines, deadline = [], time.monotonic() + 300
    for line in p.stdout:
        lines.append(line)
        if f" - step {step}/" in line:
            p.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(lines[-40:])
    out = "".join(lines) + p.communicate(timeout=300)[0]
    return p.returncode, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_launcher_checkpoints_every_rank_and_exits_75(tmp_path, sig):
    reference = tmp_path / "reference"
    reference.mkdir()
    torchrun([*RUN, "trainer.checkpoint_every=0"], reference)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    code, out = launch_and_signal([*RUN, "trainer.checkpoint_every=0"], stopped, sig)
    assert code == 75, out[-4000:]
    assert "lcm-exp-launch: exit 75" in out
    (ckpt,) = stopped.glob("outputs/*/*/checkpoints/checkpoint-*")  # (checkpoint_every=0: the preemption's)
    step = int(ckpt.name.split("-")[1])
    assert 2 <= step < 6 and {p.name for p in ckpt.glob("rank_state_*.json")} == {"rank_state_0.json",
                                                                                  "rank_state_1.json"}
    _, run = only_run(stopped)
    assert run.info.status == "KILLED" and run.data.tags["lcm_exp.preempted"] == "true"
    assert run.data.tags["lcm_exp.preempted_by"] == sig.name
    assert run.data.tags["lcm_exp.preempted_at_step"] == str(step)
    r = subprocess.run([*LAUNCH, *RUN, "trainer.checkpoint_every=0", "trainer.resume=latest"], cwd=stopped,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(stopped) == losses(reference)  # (every step logged once, each the uninterrupted run's value)


def test_plain_torchrun_forwards_sigterm_and_exits_1(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lcm_exp", *RUN, "trainer.checkpoint_every=0"], cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if " - step 2/" in line:
            p.send_signal(signal.SIGTERM)
            break
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 1, out[-3000:]
    assert len(list(Path(tmp_path).glob("outputs/*/*/checkpoints/checkpoint-*/rank_state_1.json"))) == 1
    _, run = only_run(tmp_path)
    assert run.info.status == "KILLED"
