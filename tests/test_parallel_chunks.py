"""trainer.parallel_chunks: the batch as concurrent chunks gives the whole batch's loss and gradients, draws the
same random numbers, and refuses the setups where chunks sharing modules would be wrong."""
import threading

import pytest
import torch
from hydra import compose, initialize_config_dir

from lcm_exp.bench import Ours, Setup
from lcm_exp.cli import config_dir
from lcm_exp.config import register


def compose_bench(tmp_path, *overrides):
    register()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("bench", overrides=["data.resolution=32", "trainer.cpu=true", f"data.cache_dir={tmp_path}",
                                           *overrides])


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def grads_of(trainer, path, generator, chunked: bool, times: int = 1):
    """The student's accumulated gradients after `times` loss+backward passes of one path's batch."""
    for p in trainer._params:
        p.grad = None
    losses = []
    for _ in range(times):
        latents, cond, uncond = trainer.condition(path.teacher, path.batch, generator)
        if chunked:
            losses.append(trainer._chunked_loss_and_backward(latents, cond, uncond, generator))
        else:
            loss = trainer.lcd.loss(latents, cond, uncond, generator)
            trainer.accelerator.backward(loss)
            losses.append(loss.detach())
    return losses, [p.grad.clone() for p in trainer._params]


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("batch,chunks", [(4, 2), (5, 3)])  # even and uneven chunk sizes
def test_chunks_give_the_whole_batch_loss_and_gradients(tmp_path, monkeypatch, two_threads, batch, chunks):
    monkeypatch.chdir(tmp_path)
    s = Setup(compose_bench(tmp_path, f"trainer.batch_size={batch}", f"trainer.parallel_chunks={chunks}"))
    ours = Ours(s)
    trainer = ours.trainer
    assert trainer.chunks == chunks and trainer._chunk_threads == 1
    # two accumulated micro-steps, so the add into existing .grad is covered too
    loss_c, grads_c = grads_of(trainer, ours, torch.Generator().manual_seed(3), chunked=True, times=2)
    loss_w, grads_w = grads_of(trainer, ours, torch.Generator().manual_seed(3), chunked=False, times=2)
    assert loss_w[0].item() > 0 and loss_w[0].item() != loss_w[1].item()
    for a, b in zip(loss_c, loss_w):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert len(grads_c) == len(grads_w) > 0 and all(g.norm() > 0 for g in grads_w)
    # fp32 summation order alone (the loss is a small difference of two UNet outputs, so relative errors of
    # 1e-4 show up); a chunk lost or counted twice would be off by tens of percent
    assert max(relative_error(gc, gw) for gc, gw in zip(grads_c, grads_w)) < 2e-3
    # the chunks' gradients are summed in a fixed order: bit-identical when repeated
    _, grads_again = grads_of(trainer, ours, torch.Generator().manual_seed(3), chunked=True, times=2)
    assert all(torch.equal(a, b) for a, b in zip(grads_again, grads_c))
    # a generator at another seed gives other gradients: the comparison can fail
    _, grads_other = grads_of(trainer, ours, torch.Generator().manual_seed(4), chunked=True, times=2)
    assert max(relative_error(a, b) for a, b in zip(grads_other, grads_w)) > 0.1
    # the chunks ran on their own threads, one OpenMP thread each; the caller's thread count is untouched
    assert torch.get_num_threads() == 2


def test_chunks_run_concurrently_on_worker_threads(tmp_path, monkeypatch, two_threads):
    monkeypatch.chdir(tmp_path)
    s = Setup(compose_bench(tmp_path, "trainer.batch_size=4", "trainer.parallel_chunks=2"))
    ours = Ours(s)
    seen, barrier = [], threading.Barrier(2, timeout=60)
    student = ours.trainer.lcd.student

    def spy(*args, **kwargs):  # both chunks must reach the student's forward at the same time
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        barrier.wait()
        return student(*args, **kwargs)

    ours.trainer.lcd.student = spy
    ours.step(torch.Generator().manual_seed(0))
    assert len(seen) == 2 and {n for n, _ in seen} != {threading.current_thread().name}
    assert all(name.startswith("lcd-chunk") and threads == 1 for name, threads in seen)


def test_auto_picks_two_chunks_on_a_multicore_cpu_and_one_otherwise(tmp_path, monkeypatch, two_threads):
    monkeypatch.chdir(tmp_path)
    s = Setup(compose_bench(tmp_path, "trainer.batch_size=2"))
    assert s.cfg.trainer.parallel_chunks == 1 and Ours(s).trainer.chunks == 1  # off by default
    s = Setup(compose_bench(tmp_path, "trainer.batch_size=2", "trainer.parallel_chunks=auto"))
    assert Ours(s).trainer.chunks == 2
    torch.set_num_threads(1)
    s = Setup(compose_bench(tmp_path, "trainer.batch_size=2", "trainer.parallel_chunks=auto"))
    assert Ours(s).trainer.chunks == 1
    torch.set_num_threads(2)
    s = Setup(compose_bench(tmp_path, "trainer.batch_size=2", "trainer.compile=true", "trainer.parallel_chunks=auto"))
    assert s.trainer._resolve_chunks(_Lcd(torch.nn.Linear(1, 1)), s.student) == 1


class _Lcd:
    def __init__(self, teacher):
        self.teacher = teacher


@pytest.mark.parametrize("override,message", [("student=lora", "LCM-LoRA"),
                                              ("student.stochastic_depth=0.1", "stochastic_depth")])
def test_chunks_refuse_shared_or_batch_wide_state(tmp_path, monkeypatch, override, message, two_threads):
    monkeypatch.chdir(tmp_path)
    s = Setup(compose_bench(tmp_path, "trainer.batch_size=2", override))
    teacher = s.student.teacher_unet if override == "student=lora" else s.teacher.unet
    s.trainer.parallel_chunks = "auto"
    assert s.trainer._resolve_chunks(_Lcd(teacher), s.student) == 1  # auto: quietly one chunk
    s.trainer.parallel_chunks = 2
    with pytest.raises(ValueError, match=message) as e:
        s.trainer._resolve_chunks(_Lcd(teacher), s.student)
    assert "trainer.parallel_chunks=1" in str(e.value)
    s.trainer.parallel_chunks = 2
    dropout = next(m for m in s.student.unet.modules() if isinstance(m, torch.nn.Dropout))
    dropout.p = 0.1
    with pytest.raises(ValueError, match="dropout"):
        s.trainer._resolve_chunks(_Lcd(teacher), s.student)
    dropout.p = 0.0
    s.trainer.parallel_chunks = "two"
    with pytest.raises(ValueError, match="auto or a whole number"):
        s.trainer._resolve_chunks(_Lcd(teacher), s.student)
