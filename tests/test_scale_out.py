"""Data-parallel training on two CPU ranks (gloo), started as users start it: `torchrun -m lcm_exp`.

`trainer.batch_size` is the global batch: two ranks at the same global batch take the same samples (rank r
holds rows r::2) and the same draws as one process, so they log the same loss curve (to float rounding: DDP
averages two half-batch gradients; a linear schedule with warm-up, counted in optimiser steps) and end with the
same weights (every tensor of the student and the target compared). The run is one MLflow run that records its
world size, with one set of checkpoints and one export; a two-rank run stopped by SIGTERM resumes exactly;
stochastic depth and LoRA students train under DDP; the data streams of the ranks split the samples with no
duplicates, for webdataset and cached shards (shapes is webdataset shards too)."""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

from jobs import ENV, TINY, assert_every_weight_close, final_weights, lcm_exp, loss_history, only_run

pytestmark = pytest.mark.slow
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lcm_exp"]
RUN = [*TINY, "trainer.batch_size=4", "trainer.gradient_accumulation_steps=2", "trainer.max_steps=6",
       "optim.lr_scheduler=linear", "optim.lr_warmup_steps=3"]
RTOL = 1e-4  # the stated tolerance of 2 ranks against 1 at the same global batch


def torchrun(args, cwd, expect: int | None = 0, timeout: int = 600):
    r = subprocess.run([*TWO, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert r.returncode == expect, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def losses(cwd) -> dict[int, float]:
    history, run = loss_history(cwd)
    assert run.info.status == "FINISHED", run.info.status
    assert all(len(v) == 1 for v in history.values()), history  # one value per step: rank 0 logs, alone
    return {step: next(iter(v)) for step, v in sorted(history.items())}


def sigterm_at(args, cwd, step: int = 2) -> tuple[str, list[Path]]:
    """Starts two ranks with `args` and sends torchrun SIGTERM (as a scheduler does) once step `step` is logged;
    returns the output and the checkpoints written, oldest first. The run must have stopped before its end."""
    p = subprocess.Popen([*TWO, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + 300
    for line in p.stdout:
        lines.append(line)
        if f" - step {step}/" in line:
            p.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines[-40:])
    out = "".join(lines) + p.communicate(timeout=300)[0]
    assert p.returncode != 0, out[-3000:]
    saved = sorted(Path(cwd).glob("outputs/*/*/checkpoints/checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    return out, saved


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("one")
    lcm_exp(RUN, cwd)
    return cwd


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("two")
    torchrun([*RUN, "export.enabled=true"], cwd)
    return cwd


def test_two_ranks_follow_one_rank_at_the_same_global_batch(one_rank, two_ranks):
    one, two = losses(one_rank), losses(two_ranks)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert math.isclose(one[step], two[step], rel_tol=RTOL), (step, one[step], two[step])
    assert_every_weight_close(final_weights(one_rank), final_weights(two_ranks))  # (student and target, each tensor)


def test_a_different_global_batch_gives_another_curve(tmp_path, one_rank):
    torchrun([*RUN, "trainer.batch_size=8"], tmp_path)
    one, other = losses(one_rank), losses(tmp_path)
    assert not math.isclose(one[1], other[1], rel_tol=RTOL)
    with pytest.raises(AssertionError):  # (the weight check tells these runs apart)
        assert_every_weight_close(final_weights(one_rank), final_weights(tmp_path))


def test_two_ranks_are_one_mlflow_run_with_one_export(two_ranks):
    client, run = only_run(two_ranks)  # (asserts a single run)
    assert run.data.params["world_size"] == "2" and run.data.params["trainer.batch_size"] == "4"
    assert run.data.tags["lcm_exp.world_size"] == "2"
    exports = list(Path(two_ranks).glob("outputs/*/*/export/model_index.json"))
    checkpoints = {p.parent for p in Path(two_ranks).glob("outputs/*/*/checkpoints/checkpoint-*")}
    assert len(exports) == 1 and len(checkpoints) == 1
    (ckpt,) = Path(two_ranks).glob("outputs/*/*/checkpoints/checkpoint-6")
    assert {p.name for p in ckpt.glob("rank_state_*.json")} == {"rank_state_0.json", "rank_state_1.json"}


def test_two_ranks_preempted_by_sigterm_resume_exactly(tmp_path, two_ranks):
    """SIGTERM to torchrun (as a scheduler sends it): both ranks checkpoint the same step and stop; the resumed
    two-rank run logs, from there on, what the uninterrupted one did."""
    out, saved = sigterm_at(RUN, tmp_path)
    assert len(saved) == 1, out[-3000:]
    stopped = int(saved[0].name.split("-")[1])
    assert 2 <= stopped < 6 and {q.name for q in saved[0].glob("rank_state_*.json")} == {
        "rank_state_0.json", "rank_state_1.json"}
    _, run = only_run(tmp_path)
    assert run.info.status == "KILLED"
    r = torchrun([*RUN, "trainer.resume=latest"], tmp_path)
    assert f"at step {stopped}" in r.stdout + r.stderr  # ("resumed from <checkpoint> at step N": not a fresh start)
    resumed, uninterrupted = losses(tmp_path), losses(two_ranks)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(stopped + 1, 7):
        assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])


@pytest.mark.parametrize("student", [["student.stochastic_depth=0.5"], ["student=lora"]], ids=["stochastic_depth", "lora"])
def test_students_train_under_ddp(tmp_path, student):
    torchrun([*TINY, "trainer.batch_size=4", "trainer.max_steps=2", *student], tmp_path)
    assert all(math.isfinite(v) for v in losses(tmp_path).values())


def test_a_batch_size_that_does_not_split_is_refused(tmp_path):
    r = torchrun([*TINY, "trainer.batch_size=3", "trainer.max_steps=1"], tmp_path, expect=None)
    assert r.returncode != 0 and "trainer.batch_size" in r.stderr and "multiple of the 2 processes" in r.stderr


def _stream(urls, rank, world_size, batch_size, **kw):
    from lcm_exp.data.stream import Batches, ShardStream

    return Batches(ShardStream(urls, decode=lambda sample, rng: sample["__key__"],
                               collate=lambda items: {"keys": items}, batch_size=batch_size, seed=5, rank=rank,
                               world_size=world_size, shuffle_buffer=8, lanes=2, **kw))


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "epochs"])
def test_ranks_split_the_samples_with_no_duplicates(tmp_path, resampled):
    """Rank r takes rows r::2 of the one-process stream's batches, so no sample is taken by both ranks; each
    rank reads its own lane's shards only (tests/test_stream.py measures the bytes)."""
    for shard in range(3):
        with wds.TarWriter(str(tmp_path / f"s-{shard:05d}.tar")) as w:
            for i in range(8):
                w.write({"__key__": f"{shard}-{i}", "txt": "x"})
    urls = str(tmp_path / "s-{00000..00002}.tar")
    n = 6  # batches of 4

    def keys(rank, world_size, batch_size):
        it = iter(_stream(urls, rank, world_size, batch_size, resampled=resampled))
        return [next(it)["keys"] for _ in range(n)]

    whole = keys(0, 1, 4)
    r0, r1 = keys(0, 2, 2), keys(1, 2, 2)
    for b, batch in enumerate(whole):  # rank r holds rows r::2 of the global batch
        assert batch[0::2] == r0[b] and batch[1::2] == r1[b]
