"""Exact resume (issue "the real path holds"): a run killed with SIGKILL, or stopped by SIGTERM, and resumed with
`trainer.resume=latest` logs the uninterrupted run's loss at every step and ends with its weights, bit for bit at
one OpenMP thread; a damaged newest checkpoint is skipped for the one before it."""
from __future__ import annotations

import signal

import pytest

from jobs import TINY, final_weights, lcm_exp, loss_history, same_weights, stop_at

pytestmark = pytest.mark.slow
RUN = [*TINY, "trainer.checkpoint_every=5", "trainer.max_steps=30"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 30-step run: its losses and final weights."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    lcm_exp(RUN, cwd)
    history, run = loss_history(cwd)
    assert sorted(history) == list(range(1, 31)) and all(len(v) == 1 for v in history.values())
    return history, final_weights(cwd)


def assert_same_run(cwd, reference):
    """Every loss the resumed run logged (the re-run steps included) is the uninterrupted run's, at all 30
    steps, and the final student and EMA weights are equal."""
    history, run = loss_history(cwd)
    ref_history, ref_weights = reference
    assert run.info.status == "FINISHED"
    assert sorted(history) == list(range(1, 31))
    assert {s: v for s, v in history.items() if v != ref_history[s]} == {}
    assert same_weights(final_weights(cwd), ref_weights)


def test_kill_9_at_three_steps_then_resume(tmp_path, reference):
    code, out = stop_at(RUN, tmp_path, step=7, after_logged=5)
    assert code == -signal.SIGKILL, out[-2000:]
    for step, logged in ((13, 10), (19, 15)):
        code, out = stop_at([*RUN, "trainer.resume=latest"], tmp_path, step=step, after_logged=logged)
        assert code == -signal.SIGKILL and "resumed from" in out, out[-2000:]
    r = lcm_exp([*RUN, "trainer.resume=latest"], tmp_path)
    assert "checkpoint-15 at step 15" in r.stdout
    assert_same_run(tmp_path, reference)


def test_sigterm_checkpoints_tags_the_run_and_resumes(tmp_path, reference):
    code, out = stop_at(RUN, tmp_path, step=7, sig=signal.SIGTERM)
    assert code == 75, out[-3000:]  # EXIT_PREEMPTED
    stopped_at = int(out.split("preempted by SIGTERM at step ")[1].split()[0])
    assert 7 <= stopped_at < 30
    assert "saved checkpoint" in out and f"checkpoint-{stopped_at}" in out
    (ckpt,) = tmp_path.glob(f"outputs/*/*/checkpoints/checkpoint-{stopped_at}")
    assert out.strip().splitlines()[-1].endswith(f"trainer.resume={ckpt.resolve()}")
    _, run = loss_history(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["lcm_exp.preempted"] == "true"
    assert run.data.tags["lcm_exp.preempted_at_step"] == str(stopped_at)
    r = lcm_exp([*RUN, "trainer.resume=latest"], tmp_path)
    assert f"at step {stopped_at}" in r.stdout
    _, run = loss_history(tmp_path)
    assert run.data.tags["lcm_exp.preempted"] == "false"
    assert_same_run(tmp_path, reference)


def test_truncated_newest_checkpoint_is_skipped_for_the_previous(tmp_path, reference):
    lcm_exp([*RUN, "trainer.max_steps=10"], tmp_path)
    (newest,) = tmp_path.glob("outputs/*/*/checkpoints/checkpoint-10")
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = lcm_exp([*RUN, "trainer.resume=latest"], tmp_path)
    assert "checkpoint-10 is incomplete or corrupt (model.safetensors has" in r.stdout
    assert "checkpoint-5 at step 5" in r.stdout
    assert_same_run(tmp_path, reference)


# ------------------------------------------------------------------------------------ every data source, accumulation
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """LAION-style shards of the shapes dataset: four shards, half the captions under `.text`."""
    import io

    import webdataset as wds

    from lcm_exp.data.shapes import caption, render, scenes

    root = tmp_path_factory.mktemp("shards")
    for shard in range(4):
        with wds.TarWriter(str(root / f"shard-{shard:05d}.tar")) as w:
            for i, scene in enumerate(scenes("train", 10, seed=shard)):
                buf = io.BytesIO()
                render(scene, 40).save(buf, format="PNG")
                w.write({"__key__": f"{shard}-{i}", "png": buf.getvalue(), ("text" if i % 2 else "txt"): caption(scene)})
    return str(root / "shard-{00000..00003}.tar")


KINDS = {
    "shapes, accumulation 2, bf16": ["trainer.gradient_accumulation_steps=2", "trainer.mixed_precision=bf16"],
    # (checkpoints at 3 and 6: an odd number of batches, so the resumed workers take each other's turns)
    "webdataset, 2 workers, random crops": ["data=webdataset", "data.urls='{shards}'", "data.resolution=32",
                                            "data.num_workers=2", "data.center_crop=false", "data.random_flip=true",
                                            "data.shuffle_buffer=16", "trainer.checkpoint_every=3"],
    "cached": ["data=cached", "data.resolution=32", "data.num_samples=64", "data.cache_dir={cache}"],
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_data_source_resumes_exactly(tmp_path, shards, kind):
    """24 steps, checkpoints every 4 (or 3), killed after step 7: the resumed run's losses and weights are the
    uninterrupted run's (the data stream continues at the sample it had reached, in every reader)."""
    args = [*TINY, "trainer.max_steps=24", "trainer.checkpoint_every=4",
            *(a.format(shards=shards, cache=tmp_path / "cache") for a in KINDS[kind])]
    every = int([a for a in args if a.startswith("trainer.checkpoint_every=")][-1].split("=")[1])
    (ref := tmp_path / "ref").mkdir()
    (cut := tmp_path / "cut").mkdir()
    lcm_exp(args, ref)
    code, out = stop_at(args, cut, step=7, after_logged=every)
    assert code == -signal.SIGKILL, out[-2000:]
    r = lcm_exp([*args, "trainer.resume=latest"], cut)
    assert any(f"at step {s}" in r.stdout for s in range(every, 24, every)), r.stdout[-3000:]
    ref_history, run = loss_history(ref)
    history, run = loss_history(cut)
    assert sorted(history) == sorted(ref_history) == list(range(1, 25)) and run.info.status == "FINISHED"
    assert {s: v for s, v in history.items() if v != ref_history[s]} == {}
    assert same_weights(final_weights(cut), final_weights(ref))


def test_changed_shard_list_stops_or_resumes_when_asked_and_says_it_is_not_exact(tmp_path, shards):
    args = [*TINY, "trainer.checkpoint_every=1", "data=webdataset", "data.resolution=32", "data.num_workers=0"]
    lcm_exp([*args, f"data.urls='{shards}'", "trainer.max_steps=2"], tmp_path)
    other = ["data.urls='{}'".format(shards.replace("00003", "00002")), "trainer.max_steps=3", "trainer.resume=latest"]
    r = lcm_exp([*args, *other], tmp_path, expect=2)
    assert "was trained with another configuration: data.urls: 4 shards" in r.stderr
    r = lcm_exp([*args, *other, "trainer.resume_mismatch=continue"], tmp_path)
    assert "at step 2" in r.stdout
    notes = [line for line in r.stdout.splitlines() if "cannot resume exactly" in line]
    assert len(notes) == 1 and "data.urls lists other shards than the checkpoint's" in notes[0]
    history, run = loss_history(tmp_path)
    assert sorted(history) == [1, 2, 3] and run.info.status == "FINISHED"


# ------------------------------------------------------------------------------------------- failures at the end
def test_a_failure_after_training_loses_no_work(tmp_path):
    """The export fails after the last step: the run ends FAILED with the error, its trained state is
    checkpointed, the last lines name that checkpoint and the resume command, and the resumed run only
    finishes what was left (no step trains again)."""
    args = [*TINY, "trainer.max_steps=3", "export.enabled=true"]
    r = lcm_exp([*args, "export.dir=/dev/null/export"], tmp_path, expect=1)
    last = r.stderr.strip().splitlines()[-3:]
    assert "Traceback" in r.stderr and last[0].startswith("lcm-exp: stopped at step 3 by NotADirectoryError")
    assert last[1].startswith("lcm-exp: newest checkpoint: ") and last[1].endswith("checkpoints/checkpoint-3")
    assert last[2].endswith("trainer.resume=" + last[1].split(": ")[-1]) and "export.dir=/dev/null/export" in last[2]
    _, run = loss_history(tmp_path)
    assert run.info.status == "FAILED"
    r = lcm_exp([*args, "trainer.resume=latest"], tmp_path)
    assert "at step 3" in r.stdout and " - step " not in r.stdout  # nothing trained again
    assert "objective nan" not in r.stdout  # (the last logged loss, kept in the checkpoint)
    history, run = loss_history(tmp_path)
    assert run.info.status == "FINISHED" and sorted(history) == [1, 2, 3]
    assert list(tmp_path.glob("outputs/*/*/export/unet"))


def test_sigterm_during_the_end_of_run_work(tmp_path):
    """A preemption signal while the run evaluates (after training) checkpoints the trained state and exits
    EXIT_PREEMPTED; the resume evaluates and finishes without training again."""
    args = [*TINY, "trainer.max_steps=2", "eval.enabled=true", "eval.num_prompts=16", "eval.batch_size=1",
            "eval.reference_steps=50", "export.enabled=true"]
    import subprocess

    from jobs import ENV, command

    p = subprocess.Popen(command(args), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "exported model" in line:  # printed just before the evaluation starts
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + p.communicate(timeout=300)[0]
    assert p.returncode == 75, out[-3000:]
    assert "preempted by SIGTERM at step 2" in out and "checkpoint-2" in out
    _, run = loss_history(tmp_path)
    assert run.info.status == "KILLED" and "eval/student_4step/psnr_to_ref" not in run.data.metrics
    r = lcm_exp([*args, "eval.num_prompts=2", "trainer.resume=latest"], tmp_path)
    assert "at step 2" in r.stdout and " - step " not in r.stdout
    _, run = loss_history(tmp_path)
    assert run.info.status == "FINISHED" and "eval/student_4step/psnr_to_ref" in run.data.metrics


def test_sigterm_to_the_process_group_with_loader_workers(tmp_path, shards):
    """SLURM signals every process of a job: the DataLoader workers must not die under the training step; the
    run checkpoints, exits 75 and resumes exactly."""
    args = [*TINY, "trainer.max_steps=10", "trainer.checkpoint_every=5", "data=webdataset", f"data.urls='{shards}'",
            "data.resolution=32", "data.num_workers=2"]
    (ref := tmp_path / "ref").mkdir()
    (cut := tmp_path / "cut").mkdir()
    lcm_exp(args, ref)
    code, out = stop_at(args, cut, step=3, sig=signal.SIGTERM, group=True)
    assert code == 75, out[-3000:]
    assert "could not be written" not in out and "Traceback" not in out
    lcm_exp([*args, "trainer.resume=latest"], cut)
    ref_history, _ = loss_history(ref)
    history, run = loss_history(cut)
    assert run.info.status == "FINISHED" and sorted(history) == list(range(1, 11))
    assert {s: v for s, v in history.items() if v != ref_history[s]} == {}
    assert same_weights(final_weights(cut), final_weights(ref))


# ------------------------------------------------------------------------------- what a resume keeps (issue 26)
def test_speed_and_placement_switches_keep_the_checkpoint_and_a_real_change_stops(tmp_path):
    """Turning on activation checkpointing after an OOM, another attention kernel, more loader workers, the
    teacher cache elsewhere: the same trajectory, resumed. A changed learning rate: exit 2 naming the key, and
    resumed (tagged) only when asked."""
    args = [*TINY, "trainer.checkpoint_every=2"]
    lcm_exp([*args, "trainer.max_steps=2"], tmp_path)
    switches = ["trainer.gradient_checkpointing=true", "trainer.attention=sdpa", "data.num_workers=1",
                "trainer.channels_last=true", "trainer.batched_cfg=false", "trainer.max_steps=3"]
    r = lcm_exp([*args, *switches, "trainer.resume=latest"], tmp_path)
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    r = lcm_exp([*args, "trainer.max_steps=4", "optim.lr=3e-5", "trainer.resume=latest"], tmp_path, expect=2)
    assert "optim.lr: 0.0001 -> 3e-05" in r.stderr and "trainer.resume_mismatch=continue" in r.stderr
    assert "Traceback" not in r.stderr
    r = lcm_exp([*args, "trainer.max_steps=4", "optim.lr=3e-5", "trainer.resume=latest",
                 "trainer.resume_mismatch=continue"], tmp_path)
    assert "at step 3" in r.stdout
    history, run = loss_history(tmp_path)
    assert sorted(history) == [1, 2, 3, 4] and run.data.tags["lcm_exp.resumed_with_changes"] == (
        "optim.lr: 0.0001 -> 3e-05")


def test_sigterm_while_waiting_for_data_checkpoints_the_last_step(tmp_path):
    """A stream that stalls (a piped shard that stops sending after its 10th sample: steps 1 and 2 take 8, the
    next one waits): SIGTERM while the run waits for its batch checkpoints the last finished step and exits 75
    at once."""
    import io
    import os
    import subprocess
    import tarfile
    import time

    import webdataset as wds
    from PIL import Image

    from jobs import ENV, command

    shard = tmp_path / "slow-00000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(20):  # (30 KB each: the reader's 10 KB reads never wait for the sample after the one it needs)
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (10 * i, 100, 50)).save(buf, format="PNG")
            w.write({"__key__": f"{i:03d}", "png": buf.getvalue(), "txt": f"square {i}", "pad": os.urandom(30_000)})
    cut = tarfile.open(shard).getmembers()[3 * 10].offset  # (10 whole samples of 3 members each)
    stalled = f"pipe:exec 2>/dev/null; head -c {cut} {shard}; sleep 600"  # (the shell must not hold our stderr)
    args = [*TINY, "data=webdataset", f"data.urls='{stalled}'", "data.resolution=32", "data.lanes=1",
            "data.shuffle_buffer=1", "trainer.max_steps=50"]
    p = subprocess.Popen(command(args), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if " - step 2/" in line:
                break
        time.sleep(5)  # (waiting for step 3's batch, which never comes)
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out = "".join(lines) + p.communicate(timeout=60)[0]
        took = time.monotonic() - t0
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # (the shell still sleeping in the pipe)
    assert p.returncode == 75, out[-3000:]
    assert "preempted by SIGTERM at step 2" in out and " - step 3/" not in out
    assert list(tmp_path.glob("outputs/*/*/checkpoints/checkpoint-2"))
    assert took < 30, took  # (within a grace window: the stalled loader worker is killed, not waited for)


def test_progress_bar_auto_draws_nothing_into_a_log_file(tmp_path):
    import re

    bar = re.compile(r"lcm-exp: +\d+%\|")  # (our bar; diffusers' own loading bars are not ours to hide)
    r = lcm_exp([*TINY, "trainer.max_steps=3", "trainer.progress_bar=auto"], tmp_path)  # (output to a pipe)
    assert not bar.search(r.stderr) and "step/s" not in r.stderr and "s/step" not in r.stderr
    r = lcm_exp([*TINY, "trainer.max_steps=3", "trainer.progress_bar=true"], tmp_path)  # (forced: drawn)
    assert bar.search(r.stderr)
