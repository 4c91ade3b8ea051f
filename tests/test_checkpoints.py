"""Crash-safe checkpoints: written whole or not at all, a failed write (a full disk) leaves the previous one
intact and training going, leftovers of an interrupted save are cleared, time-based checkpoints, and the
preemption guard's two modes."""
from __future__ import annotations

import errno
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lcm_exp.train import checkpoint as ckpt
from lcm_exp.train.resume import find, trajectory_config


class NoTracker:
    def log_metrics(self, metrics, step):
        pass


def fit(tmp_path, *overrides):
    """A real run's trainer.fit on the tiny random teacher, in this process (no Hydra job, no MLflow)."""
    from lcm_exp.cli import config_dir
    from lcm_exp.runner import build

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["teacher=tiny_random", "data.resolution=32", "data.num_samples=64",
                                           "trainer.batch_size=2", "trainer.log_every=1", "trainer.cpu=true",
                                           "trainer.progress_bar=false", f"teacher.cache_dir={tmp_path}",
                                           f"data.cache_dir={tmp_path}", *overrides])
    trainer = instantiate(cfg.trainer)(job_dir=str(tmp_path / "run"))
    parts = build(cfg, trainer)
    trainer.prepare(parts.step, parts.student, parts.ema, parts.optim.optimizer, parts.scheduler, parts.auxiliary)
    data = instantiate(cfg.data)(batch_size=2, teacher=parts.teacher)
    trainer.fit(parts.teacher, data, NoTracker(), max_grad_norm=1.0, state={"config": trajectory_config(cfg)})
    return trainer


def test_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, monkeypatch, caplog):
    real, calls = Accelerator.save_state, []

    def full_disk(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:  # the second save runs out of space half way through its first file
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with caplog.at_level(logging.INFO, logger="lcm_exp.train.trainer"):
        trainer = fit(tmp_path, "trainer.max_steps=3", "trainer.checkpoint_every=1",
                      "trainer.checkpoints_total_limit=5")
    assert trainer.global_step == 3 and trainer.saved_step == 3
    folder = trainer.checkpoint_dir
    assert [p.name for p in ckpt.listed(folder)] == ["checkpoint-1", "checkpoint-3"]
    assert all(ckpt.problem(p) is None for p in ckpt.listed(folder))
    assert not list(folder.glob(".tmp-*"))  # the half-written one is gone
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "checkpoint at step 2 could not be written (OSError: [Errno 28] No space left" \
        in errors[0] and "checkpoint-1 is intact" in errors[0]


def test_manifest_catches_damage_and_interrupted_saves_are_cleared(tmp_path):
    trainer = fit(tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=1")
    one, two = ckpt.listed(trainer.checkpoint_dir)
    assert ckpt.problem(two) is None
    (two / "optimizer.bin").unlink()
    assert ckpt.problem(two) == "optimizer.bin is missing"
    (one / "rank_state_0.json").write_bytes(b"x")
    assert "rank_state_0.json has 1 bytes" in ckpt.problem(one)
    assert ckpt.usable([one, two]) == []
    leftover = ckpt.temporary(trainer.checkpoint_dir, 3)
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in ckpt.listed(trainer.checkpoint_dir)] == ["checkpoint-1", "checkpoint-2"]
    trainer.save_checkpoint([], {})
    assert not leftover.exists()


def test_checkpoint_every_minutes(tmp_path):
    trainer = fit(tmp_path, "trainer.max_steps=3", "trainer.checkpoint_every=0",
                  "trainer.checkpoint_every_minutes=0.000001", "trainer.checkpoints_total_limit=5")
    assert [p.name for p in ckpt.listed(trainer.checkpoint_dir)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    trainer = fit(tmp_path / "hour", "trainer.max_steps=3", "trainer.checkpoint_every=0",
                  "trainer.checkpoint_every_minutes=60")
    assert ckpt.listed(trainer.checkpoint_dir) == []


def test_signal_guard_defers_in_the_loop_and_raises_elsewhere():
    from lcm_exp.train.preemption import Preempted, SignalGuard

    before = signal.getsignal(signal.SIGTERM)
    with SignalGuard() as guard:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert guard.requested == "SIGUSR1"  # noted, nothing raised inside the training loop
        with pytest.raises(Preempted, match="SIGUSR1"):
            guard.check()
        with pytest.raises(Preempted, match="SIGTERM"):
            guard.requested = None
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_damaged_contents_of_the_right_size_are_caught_before_anything_loads(tmp_path):
    trainer = fit(tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=1")
    one, two = ckpt.listed(trainer.checkpoint_dir)
    ema = two / "custom_checkpoint_0.pkl"
    raw = bytearray(ema.read_bytes())
    raw[len(raw) // 3: len(raw) // 3 + 64] = bytes(64)  # zeroed in the middle, the size unchanged
    ema.write_bytes(bytes(raw))
    assert ckpt.problem(two) is None  # (the manifest cannot see it)
    assert "custom_checkpoint_0.pkl is damaged" in ckpt.unreadable(two)
    assert ckpt.unreadable(one) is None
    before = {n: p.detach().clone() for n, p in trainer.unwrap(trainer.unet).named_parameters()}
    state = trainer.resume_from([two, one])  # the damaged one is skipped whole: nothing of it is loaded
    assert state["step"] == 1 and trainer.global_step == 1 and state["path"] == str(one)
    after = dict(trainer.unwrap(trainer.unet).named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # (step 1's weights, not step 2's)


def test_latest_is_the_newest_written_not_the_highest_step(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"trainer": {"max_steps": 1}, "skip": {"k": 20}})
    for run, step, when in (("old", 30, 1000.0), ("new", 10, 2000.0)):
        folder = tmp_path / "outputs" / run / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / ckpt.STATE_FILE).write_text(__import__("json").dumps({
            "step": step, "config": trajectory_config(cfg), "time": when, "files": {}}))
    found = find("latest", cfg, tmp_path, tmp_path / "outputs" / "new")
    assert [p.parent.parent.name for p in found.candidates] == ["new", "old"] and found.differs == []


def test_a_complete_save_cut_between_its_renames_is_restored(tmp_path):
    trainer = fit(tmp_path, "trainer.max_steps=1", "trainer.checkpoint_every=1")
    (done,) = ckpt.listed(trainer.checkpoint_dir)
    moved = ckpt.temporary(trainer.checkpoint_dir, 1)
    done.rename(moved)  # as if the process died after writing trainer_state.json, before the final rename
    ckpt.clear_temporary(trainer.checkpoint_dir)
    assert [p.name for p in ckpt.listed(trainer.checkpoint_dir)] == ["checkpoint-1"] and not moved.exists()


def test_a_target_at_another_path_of_the_same_class_is_the_same_trajectory():
    """A checkpoint names the method's class by the path it had then: a path that still names the same class (a
    re-export, a module of the flat layout) is no change; another class is."""
    from lcm_exp.train.resume import differences

    def method(target):
        return {"method": {"_target_": target}}

    now = method("lcm_exp.distill.methods.lcd.Distillation")
    for same in ("lcm_exp.distill.methods.Distillation", "lcm_exp.methods.Distillation"):
        assert differences(method(same), now) == []
    assert differences(method("lcm_exp.distill.methods.ct.ConsistencyTraining"), now) == [
        "method._target_: lcm_exp.distill.methods.ct.ConsistencyTraining -> lcm_exp.distill.methods.lcd.Distillation"]
    assert len(differences(method("lcm_exp.no_such.Thing"), now)) == 1
