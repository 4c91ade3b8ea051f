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
    assert f"saved checkpoint" in out and f"checkpoint-{stopped_at}" in out
    assert "resume with" in out and "trainer.resume=latest" in out.splitlines()[-1]
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
    "webdataset, 2 workers, random crops": ["data=webdataset", "data.urls={shards}", "data.resolution=32",
                                            "data.num_workers=2", "data.center_crop=false", "data.random_flip=true",
                                            "data.shuffle_buffer=16", "trainer.gradient_accumulation_steps=2"],
    "cached": ["data=cached", "data.resolution=32", "data.num_samples=64", "data.cache_dir={cache}"],
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_data_source_resumes_exactly(tmp_path, shards, kind):
    """12 steps, checkpoints every 4, killed after step 7: the resumed run's losses and weights are the
    uninterrupted run's (the data stream continues at the sample it had reached, in every reader)."""
    args = [*TINY, "trainer.max_steps=12", "trainer.checkpoint_every=4",
            *(a.format(shards=shards, cache=tmp_path / "cache") for a in KINDS[kind])]
    (ref := tmp_path / "ref").mkdir()
    (cut := tmp_path / "cut").mkdir()
    lcm_exp(args, ref)
    code, out = stop_at(args, cut, step=7, after_logged=4)
    assert code == -signal.SIGKILL, out[-2000:]
    r = lcm_exp([*args, "trainer.resume=latest"], cut)
    assert "at step 4" in r.stdout or "at step 8" in r.stdout
    ref_history, run = loss_history(ref)
    history, run = loss_history(cut)
    assert sorted(history) == sorted(ref_history) == list(range(1, 13)) and run.info.status == "FINISHED"
    assert {s: v for s, v in history.items() if v != ref_history[s]} == {}
    assert same_weights(final_weights(cut), final_weights(ref))


def test_changed_shard_list_resumes_and_says_it_is_not_exact(tmp_path, shards):
    args = [*TINY, "trainer.checkpoint_every=1", "data=webdataset", "data.resolution=32", "data.num_workers=0"]
    lcm_exp([*args, "data.urls=" + shards, "trainer.max_steps=2"], tmp_path)
    r = lcm_exp([*args, "data.urls=" + shards.replace("00003", "00002"), "trainer.max_steps=3",
                 "trainer.resume=latest"], tmp_path)
    assert "at step 2" in r.stdout
    notes = [line for line in r.stdout.splitlines() if "cannot resume exactly" in line]
    assert len(notes) == 1 and "data.urls lists other shards than the checkpoint's" in notes[0]
    history, run = loss_history(tmp_path)
    assert sorted(history) == [1, 2, 3] and run.info.status == "FINISHED"
