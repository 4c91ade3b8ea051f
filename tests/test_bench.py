"""lcm-exp-bench: the reference step and ours compute the same loss on the same inputs; the command's last line
is one JSON object with the contract keys. (Speed itself is reported by the command, never asserted here.)"""
import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from lcm_exp.bench import (ABLATIONS, Ours, Reference, Setup, ablation, ablations, count_flops, inert, run_bench,
                           time_interleaved, variant)
from lcm_exp.cli import config_dir


def compose_bench(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("bench", overrides=["data.resolution=32", "trainer.batch_size=2", "trainer.cpu=true",
                                           *overrides])


def test_reference_and_ours_compute_the_same_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    s = Setup(compose_bench("loss=l2", f"data.cache_dir={tmp_path}"))
    initial = {k: v.clone() for k, v in s.student.unet.state_dict().items()}
    ref, ours = Reference(s), Ours(s)
    loss_ref = ref.step(torch.Generator().manual_seed(7))
    s.student.unet.load_state_dict(initial)
    loss_ours = ours.step(torch.Generator().manual_seed(7))
    assert loss_ref.item() > 0
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-4, atol=1e-7)
    # and both then trained the same student the same way: equal grads made equal AdamW first steps
    s.student.unet.load_state_dict(initial)
    loss_other_seed = ours.step(torch.Generator().manual_seed(8))
    assert abs(loss_other_seed.item() - loss_ref.item()) > 1e-6  # the comparison is not vacuous


def test_reference_runs_diffusers_sdpa_and_ours_the_small_head_kernel(tmp_path, monkeypatch):
    """They share the student and teacher UNets, so each step must put its own processors on them."""
    from lcm_exp import attention

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    s = Setup(compose_bench(f"data.cache_dir={tmp_path}"))
    ref, ours = Reference(s), Ours(s)
    calls = []
    kernel = attention.small_head_attention
    monkeypatch.setattr(attention, "small_head_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ref.step(torch.Generator().manual_seed(0))
    assert not calls
    ours.step(torch.Generator().manual_seed(0))
    assert calls
    calls.clear()
    ref.step(torch.Generator().manual_seed(0))
    assert not calls


def test_bench_defaults_to_the_tiny_test_teacher():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("bench")
    assert cfg.teacher._target_ == "lcm_exp.teachers.tiny_random.load" and cfg.teacher.name == "tiny_random"
    assert cfg.data.resolution == 64 and cfg.trainer.batch_size == 8


def test_ablations_resolve():
    each = ablations(["each"])
    assert set(each) == set(ABLATIONS) and each["overlap_frozen"] == ["trainer.overlap_frozen=false"]
    assert set(each["all"]) >= {"trainer.batched_cfg=false", "bench.cached=false", "optim.fused=false"}
    assert list(ablations(["cached", "each"]))[0] == "cached"
    with pytest.raises(ValueError, match="unknown switch"):
        ablations(["batched"])
    cfg = variant(compose_bench(), ABLATIONS["all"])
    assert cfg.trainer.overlap_frozen is False and cfg.trainer.batched_cfg is False and cfg.bench.cached is False


def test_ablations_that_would_change_nothing_are_named():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = compose_bench()
    assert "fp32" in inert("cast_frozen", cfg, cpu)
    assert inert("cast_frozen", compose_bench("trainer.mixed_precision=bf16"), cuda) is None
    assert inert("attention", cfg, cpu) is None and "SDPA" in inert("attention", cfg, cuda)
    assert all(inert(n, cfg, cpu) is None for n in ("batched_cfg", "teacher_first", "cached", "fused_adamw",
                                                    "overlap_frozen", "all"))
    assert "already off" in inert("overlap_frozen", compose_bench("trainer.overlap_frozen=false"), cpu)


def test_bench_runs_overlap_frozen_at_half_the_threads_and_counts_its_flops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg = compose_bench(f"data.cache_dir={tmp_path}")
        s = Setup(cfg)
        ref, ours = Reference(s), Ours(s)
        serial = Ours(s, variant(cfg, ABLATIONS["overlap_frozen"]), name="without_overlap_frozen")
        assert ours.overlap and not serial.overlap
        # each path starts its steps with its own thread count: the reference and the serial step all of them
        for path, n in ((ours, 1), (ref, 2), (ours, 1), (serial, 2)):
            path.activate()
            assert torch.get_num_threads() == n
        # with the overlap on, teacher_first orders nothing; with it off (here: one thread) it is named as off
        assert "own thread" in inert("teacher_first", cfg, torch.device("cpu"), ours)
        assert inert("overlap_frozen", cfg, torch.device("cpu"), ours) is None
        assert "off here" in inert("overlap_frozen", cfg, torch.device("cpu"), serial)
        # the FLOP counter sees its own thread only: the overlapped step is counted serially, so all its passes count
        flops = count_flops(ours, 1)
        assert flops == count_flops(serial, 1) > 0
        # also with the next teacher pass already prepared (the attention kernel's pass choice may move with the
        # trained weights, so not to the FLOP; a pass left uncounted would be a third of the step or more)
        ours.step(torch.Generator().manual_seed(0))
        assert count_flops(ours, 1) == pytest.approx(flops, rel=0.02)
        ours.step(torch.Generator().manual_seed(0))  # and the overlap still works after it
        ours.drain()
    finally:
        torch.set_num_threads(before)


def test_rounds_count_work_a_step_leaves_running():
    """A step that returns with work still running (overlap_frozen's next teacher pass) is charged for it, and
    the next path's steps never run beside it."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    class Lazy:
        name, pool, futures = "lazy", ThreadPoolExecutor(1), []

        def activate(self):
            pass

        def step(self, gen):
            self.futures.append(self.pool.submit(time.sleep, 0.1))

        def drain(self):
            for f in self.futures:
                f.result()

    lazy, seen = Lazy(), []

    class Busy(Lazy):
        name = "busy"

        def step(self, gen):
            seen.append(all(f.done() for f in lazy.futures))

    times, _ = time_interleaved([Busy(), lazy], torch.device("cpu"), None, warmup=1, rounds=2, steps_per_round=3)
    assert len(times["lazy"]) == 2 and min(times["lazy"]) >= 0.095  # per round: the mean of three 0.1 s steps
    assert seen and all(seen)


def test_ablations_change_their_own_switch_only(tmp_path, monkeypatch):
    """Switches that resolve at run time keep ours' values in an ablation: on one thread overlap_frozen=auto is
    off for ours, so an ablation of another switch must not turn it on."""
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg = compose_bench(f"data.cache_dir={tmp_path}")
        ours = Ours(Setup(cfg))
        assert ours.overlap and ablation(cfg, ours, ABLATIONS["attention"]).trainer.overlap_frozen is True
        assert ablation(cfg, ours, ABLATIONS["all"]).trainer.overlap_frozen is False
        torch.set_num_threads(1)
        ours = Ours(Setup(cfg))
        assert not ours.overlap and ablation(cfg, ours, ABLATIONS["attention"]).trainer.overlap_frozen is False
    finally:
        torch.set_num_threads(before)


def test_bench_gives_the_threads_back(tmp_path, monkeypatch):
    """The overlapped path runs its steps at half the threads; a later bench (a multirun) must not inherit that."""
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = run_bench(compose_bench(f"data.cache_dir={tmp_path}", "bench.warmup=0", "bench.rounds=1",
                                         "bench.steps_per_round=1"))
        assert result["ours_overlap_frozen"] is True and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bench_command_prints_json_last(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from lcm_exp.cli import bench; bench()", "data.resolution=32",
                        "trainer.batch_size=2", "bench.warmup=1", "bench.rounds=2", "bench.steps_per_round=1",
                        "bench.flops=true", f"data.cache_dir={tmp_path}",
                        "bench.ablate=[overlap_frozen,attention,cast_frozen]"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("reference_samples_per_s", "ours_samples_per_s", "speedup", "reference_peak_mem_mb",
                "ours_peak_mem_mb", "device"):
        assert key in result
    assert result["device"] == "cpu" and result["steps_timed"] == 2
    assert result["speedup"] == result["ours_samples_per_s"] / result["reference_samples_per_s"]
    # the ablation ran interleaved with the others: ours with its attention kernel, the variant with SDPA;
    # one thread leaves the overlap off and nothing is cast in fp32, so there was no variant without them to time
    assert result["without_attention_samples_per_s"] > 0
    assert result["speedup_without_attention"] == (result["without_attention_samples_per_s"]
                                                   / result["reference_samples_per_s"])
    assert "without_attention" in r.stdout.strip().splitlines()[-3]
    assert result["ours_overlap_frozen"] is False and "without_overlap_frozen_samples_per_s" not in result
    assert "without overlap_frozen here: trainer.overlap_frozen=auto is off here" in r.stderr + r.stdout
    assert "without_cast_frozen_samples_per_s" not in result and "nothing is cast in fp32" in r.stderr + r.stdout
    # ours runs one batched teacher pass and skips the encoders: fewer FLOPs per step than the reference
    assert 0 < result["ours_tflop_per_step"] < result["reference_tflop_per_step"]
    if sys.platform == "linux":  # CPU peak memory: at least the networks both paths keep resident (~8 MB here)
        assert result["reference_peak_mem_mb"] > 5 and result["ours_peak_mem_mb"] > 5
        assert "peak" in r.stdout.strip().splitlines()[-5]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self")
def test_cpu_peak_memory_sees_a_step_s_transient_tensors():
    from lcm_exp.bench import _cpu_rest, _proc_status

    rest = _cpu_rest()
    if rest is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    x = torch.ones(16, 2 ** 20)  # 64 MB, touched
    del x
    assert _proc_status("VmHWM") - rest >= 60 * 2 ** 20
    rest = _cpu_rest()  # the mark resets: a step that allocates nothing raises it by (almost) nothing
    assert _proc_status("VmHWM") - rest < 16 * 2 ** 20
