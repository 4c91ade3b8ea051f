"""trainer.overlap_frozen: the teacher's and the target's passes on a second thread give the sequential run's
losses and weights (bit for bit at equal thread counts), leave nothing running across validation and
checkpoints, pass the worker's errors on, and refuse the setups where two threads would be wrong."""
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lcm_exp import executors
from lcm_exp.bench import Setup
from lcm_exp.cli import config_dir
from lcm_exp.executors import Overlapped
from lcm_exp.lcd import LCD
from lcm_exp.methods import ConsistencyTraining


def compose_bench(tmp_path, *overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("bench", overrides=["data.resolution=32", "trainer.batch_size=2", "trainer.cpu=true",
                                           f"data.cache_dir={tmp_path}", *overrides])


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


class Parts:
    """What `lcm_exp.runner.run` hands to `Trainer.fit`, built from a bench config (no Hydra job, no MLflow)."""

    def __init__(self, cfg):
        self.s = s = Setup(cfg)
        self.trainer = s.trainer
        self.ema = instantiate(cfg.ema)(online=s.student.unet)
        optim = instantiate(cfg.optim)(params=s.student.trainable_parameters())
        self.optimizer, self.scheduler = optim.optimizer, optim.schedule(10 ** 9)
        self.lcd = LCD(student=s.student.unet, target=self.ema.target, teacher=s.teacher.unet, schedule=s.schedule,
                       solver=instantiate(cfg.solver), skip=s.skip, guidance=s.guidance, distance=s.distance,
                       w_embedding_dim=s.student.w_embedding_dim, batched_cfg=cfg.trainer.batched_cfg,
                       teacher_first=cfg.trainer.teacher_first)
        self.data = instantiate(cfg.data)(batch_size=cfg.trainer.batch_size)

    def prepare(self):
        self.trainer.prepare(self.lcd, self.s.student, self.ema, self.optimizer, self.scheduler)
        return self.trainer

    def fit(self, on_validate=None):
        losses = {}
        self.prepare()
        self.trainer.fit(self.s.teacher, self.data, _NoTracker(), max_grad_norm=1.0, on_validate=on_validate,
                         on_log=lambda step, stats: losses.update({step: stats["train/loss"]}))
        return losses

    def executor(self, **kw):
        """The executor `trainer.overlap_frozen` resolves to for these parts (`kw`: overrides of build's)."""
        t = self.trainer
        args = dict(overlap_frozen=t.overlap_frozen, lcd=self.lcd, student_unet=self.s.student.unet,
                    condition=t.condition, device=t.accelerator.device, compile=t.compile,
                    context=t.accelerator.autocast) | kw
        return executors.build(**args)


class _NoTracker:
    def log_metrics(self, metrics, step):
        pass


RUN = ["trainer.max_steps=3", "trainer.gradient_accumulation_steps=2", "trainer.log_every=1",
       "trainer.validation_every=2", "trainer.checkpoint_every=2"]


def spy_threads(monkeypatch, parts):
    """Which threads ran the teacher's solver step and the target pass, and how many OpenMP threads each had."""
    seen = {"solver_step": [], "target_fn": []}
    for name in seen:
        method = getattr(parts.lcd, name)

        def spy(*args, _method=method, _name=name):
            seen[_name].append((threading.current_thread().name, torch.get_num_threads()))
            return _method(*args)
        monkeypatch.setattr(parts.lcd, name, spy)
    return seen


@pytest.mark.parametrize("n_threads", [1, 2])
def test_overlap_repeats_the_sequential_run(tmp_path, monkeypatch, threads, n_threads):
    monkeypatch.chdir(tmp_path)
    threads(n_threads)
    results = {}
    for overlap in (True, False):
        monkeypatch.chdir((tmp_path / str(overlap)).mkdir() or tmp_path / str(overlap))
        parts = Parts(compose_bench(tmp_path, *RUN, f"trainer.overlap_frozen={overlap}"))
        seen = spy_threads(monkeypatch, parts)
        hooks = []

        def on_validate(step, parts=parts):  # validation sees no work running and the caller's full threads
            ex = parts.trainer.executor
            hooks.append((step, torch.get_num_threads(), ex.frozen._ahead if isinstance(ex, Overlapped) else None))
            torch.randn(3)  # and draws from torch's default generator, as the validation sampler does
        losses = parts.fit(on_validate)
        rng = torch.load(next(Path("checkpoints").glob("checkpoint-2/random_states_0.pkl")), weights_only=False)
        results[overlap] = (losses, [p.detach().clone() for p in parts.s.student.unet.parameters()], seen, hooks,
                            rng["torch_manual_seed"])
        assert isinstance(parts.trainer.executor, Overlapped) is overlap
        assert torch.get_num_threads() == n_threads  # (given back at the end)
        assert not [t for t in threading.enumerate() if t.name.startswith("lcd-frozen")]  # (and the worker gone)

    (losses_o, weights_o, seen_o, hooks_o, rng_o), (losses_s, weights_s, seen_s, _, rng_s) = results[True], results[False]
    # the worker draws nothing from torch's default generator (the VAE's posterior noise is the step
    # generator's), so a checkpoint records the sequential run's state and a resume continues it
    assert torch.equal(rng_o, rng_s)
    assert sorted(losses_o) == [1, 2, 3] and len(set(losses_s.values())) == 3
    if n_threads == 1:  # one OpenMP thread per stream either way: the same operations, bit for bit
        assert losses_o == losses_s
        assert all(torch.equal(a, b) for a, b in zip(weights_o, weights_s))
    else:  # two threads against one per stream: fp32 summation order only
        for step in losses_s:
            assert losses_o[step] == pytest.approx(losses_s[step], rel=1e-4)
        flat_o, flat_s = torch.cat([w.flatten() for w in weights_o]), torch.cat([w.flatten() for w in weights_s])
        assert ((flat_o - flat_s).norm() / flat_s.norm()).item() < 1e-4
    # six micro-steps, six teacher passes (none prepared past the last) and six target passes
    assert len(seen_o["solver_step"]) == len(seen_o["target_fn"]) == len(seen_s["solver_step"]) == 6
    # all but the first teacher pass and every target pass ran on the worker, with half the threads
    half = max(1, n_threads // 2)
    assert all(s == ("lcd-frozen_0", half) for s in seen_o["solver_step"][1:] + seen_o["target_fn"])
    assert seen_o["solver_step"][0][0] == threading.current_thread().name
    assert all(name == threading.current_thread().name for name, _ in seen_s["solver_step"] + seen_s["target_fn"])
    # at step 2 the next micro-step's teacher pass was prepared (done, kept); the hook ran with all threads
    assert [(step, n) for step, n, _ in hooks_o] == [(2, n_threads)]
    assert hooks_o[0][2] is not None and hooks_o[0][2][2].done()


def test_worker_errors_reach_the_caller(tmp_path, monkeypatch, threads):
    monkeypatch.chdir(tmp_path)
    threads(2)
    parts = Parts(compose_bench(tmp_path, "trainer.max_steps=2"))
    names = []

    def broken(*args):
        names.append(threading.current_thread().name)
        raise RuntimeError("target exploded")
    monkeypatch.setattr(parts.lcd, "target_fn", broken)
    with pytest.raises(RuntimeError, match="target exploded"):
        parts.fit()
    assert isinstance(parts.trainer.executor, Overlapped) and names == ["lcd-frozen_0"]  # auto, two threads: worker
    # nothing left running and the threads given back (a multirun's next job in this process starts clean)
    assert torch.get_num_threads() == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("lcd-frozen")]
    # the same for an error of the main thread's (a finite data stream ending early, here), with work prepared
    parts = Parts(compose_bench(tmp_path, "trainer.max_steps=5"))
    parts.data = [next(iter(parts.data))] * 2
    with pytest.raises(StopIteration):
        parts.fit()
    assert torch.get_num_threads() == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("lcd-frozen")]


def test_auto_turns_on_for_a_multicore_cpu_only(tmp_path, monkeypatch, threads):
    monkeypatch.chdir(tmp_path)
    threads(2)
    parts = Parts(compose_bench(tmp_path))
    trainer = parts.prepare()
    assert isinstance(trainer.executor, Overlapped) and trainer.executor.threads == 1
    threads(1)
    assert not isinstance(parts.executor(), Overlapped)
    assert isinstance(parts.executor(overlap_frozen=True), Overlapped)  # asked for: one thread per stream
    threads(2)
    assert not isinstance(parts.executor(compile=True), Overlapped)
    with pytest.raises(ValueError, match="trainer.compile=true"):
        parts.executor(overlap_frozen=True, compile=True)
    with pytest.raises(ValueError, match="auto, true or false"):
        parts.executor(overlap_frozen="yes")


@pytest.mark.parametrize("override,message", [("student=lora", "LCM-LoRA"),
                                              ("student.stochastic_depth=0.1", "stochastic-depth"),
                                              ("trainer.cpu=true", "is cuda")])
def test_overlap_refuses_shared_modules_and_shared_draws(tmp_path, monkeypatch, threads, override, message):
    monkeypatch.chdir(tmp_path)
    threads(2)
    parts = Parts(compose_bench(tmp_path, override))
    kw = {}
    if override == "student=lora":
        parts.lcd.teacher = parts.s.student.teacher_unet  # the student with its adapters off
    elif override == "student.stochastic_depth=0.1":
        # with an EMA target (eval mode) the student's draws are its own: fine
        assert isinstance(parts.executor(overlap_frozen="auto"), Overlapped)
        parts.lcd.target = parts.s.student.unet  # an online target draws its masks on the worker
    else:
        kw["device"] = torch.device("cuda")
    assert not isinstance(parts.executor(overlap_frozen="auto", **kw), Overlapped)  # auto: quietly off
    with pytest.raises(ValueError, match=message) as e:
        parts.executor(overlap_frozen=True, **kw)
    assert "trainer.overlap_frozen=false" in str(e.value)
    if override == "student=lora":  # consistency training has no teacher pass: nothing shared
        parts.lcd.method = ConsistencyTraining(from_scratch=False)
        assert isinstance(parts.executor(overlap_frozen=True), Overlapped)
