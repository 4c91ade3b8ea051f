"""The few-step methods (issue 27) against independent references: the papers' equations as the reference code
writes them (rootonchair/consistency_models_distill `tcd/` for TCD's training step, G-U-N/Phased-Consistency-Model
for PCM's phases and targets, tianweiy/DMD2 for the distribution-matching loss), and diffusers' own schedulers
(TCDScheduler, DDIMScheduler, LCMScheduler) for the samplers. Each reference is written out here, from those
codes, not taken from lcm_exp."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, TCDScheduler

from lcm_exp.distill.draws import Draws
from lcm_exp.distill.guidance import UniformGuidance
from lcm_exp.distill.losses import l2
from lcm_exp.distill.methods.dmd2 import DistributionMatching, dm_loss, generator_timesteps
from lcm_exp.distill.methods.pcm import PhasedConsistency, phase_edges, sampler_timesteps
from lcm_exp.distill.methods.tcd import TrajectoryConsistency, trajectory_fn
from lcm_exp.distill.schedules import VPSchedule
from lcm_exp.distill.skip import SkipSchedule
from lcm_exp.distill.solvers import ddim
from lcm_exp.distill.step import Step

DDPM = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
AC = DDPM.alphas_cumprod.double()


def schedule(pred="epsilon"):
    return VPSchedule(DDPM.alphas_cumprod, pred)


class Net(torch.nn.Module):
    """A tiny conditional 'UNet': out = a·z + b·(t/1000) + c·mean(cond), recording its calls."""

    def __init__(self, a=0.3, b=0.1, c=0.2):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Parameter(torch.tensor(v)) for v in (a, b, c))
        self.calls = []

    def forward(self, z, t, timestep_cond=None, encoder_hidden_states=None, **_):
        self.calls.append((z.detach().clone(), t.detach().clone()))
        cond = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        out = self.a * z + self.b * (t.float() / 1000).view(-1, 1, 1, 1) + self.c * cond
        return type("Out", (), {"sample": out})()


def step_of(method, pred="epsilon", k=20, w=(2.0, 2.0)):
    student, target, teacher = Net(), Net(0.25, 0.05, 0.1), Net(0.2, 0.2, 0.3)
    s = Step(student=student, target=target, teacher=teacher, schedule=schedule(pred), solver=ddim,
             skip=SkipSchedule(k, 1000), guidance=UniformGuidance(*w), distance=l2, w_embedding_dim=0,
             method=method)
    return s, student, target, teacher


COND = {"encoder_hidden_states": torch.randn(3, 4, 8)}
UNCOND = {"encoder_hidden_states": torch.zeros(3, 4, 8)}


# ------------------------------------------------------------------------------------------------------------ TCD
def reference_tcf(eps_out, sample, t, s):
    """rootonchair `get_predicted_original_sample_tcd`: the exponential-integrator form, in float64."""
    a, sig = AC.sqrt(), (1 - AC).sqrt()
    lam = torch.log(a) - torch.log(sig)
    at, st = a[t].view(-1, 1, 1, 1), sig[t].view(-1, 1, 1, 1)
    as_, ss = a[s].view(-1, 1, 1, 1), sig[s].view(-1, 1, 1, 1)
    h = (lam[s] - lam[t]).view(-1, 1, 1, 1)
    x0 = (sample - st * eps_out) / at
    return ss * sample / st - as_ * (torch.exp(-h) - 1.0) * x0


def test_tcd_trajectory_function_is_the_exponential_integrator_and_the_tcd_scheduler_step():
    z, out = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t, s = torch.tensor([759, 500, 19]), torch.tensor([349, 0, 19])
    torch.testing.assert_close(trajectory_fn(schedule(), out, z, t, s), reference_tcf(out, z, t, s),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trajectory_fn(schedule(), out, z, t, t), z, rtol=0, atol=1e-6)  # f(x, t, t) = x
    for pred in ("epsilon", "v_prediction"):  # TCDScheduler's x_s at s = floor((1 - γ)·prev)
        tcd = TCDScheduler.from_config(DDPM.config, prediction_type=pred)
        for gamma in (0.0, 0.3, 1.0):
            tcd.set_timesteps(timesteps=[759, 499])
            ref = tcd.step(out[:1], 759, z[:1], eta=gamma, generator=torch.Generator().manual_seed(0))
            s_ = torch.tensor([math.floor((1 - gamma) * 499)])
            ours = trajectory_fn(schedule(pred), out[:1], z[:1], torch.tensor([759]), s_)
            torch.testing.assert_close(ours, ref.pred_noised_sample.double(), rtol=1e-5, atol=1e-5)


def test_tcd_end_times_lie_on_the_grid_below_t_n_and_cover_it():
    method, k = TrajectoryConsistency(gamma=0.3), 20
    step, *_ = step_of(method, k=k)
    t_start = torch.tensor([999] * 400 + [19] * 10)
    s = method.end_time(step, t_start, Draws(0, 0, range(len(t_start))))
    assert ((s == 0) | ((s + 1) % k == 0)).all() and (s <= (t_start - k).clamp(min=0)).all()
    assert (s[400:] == 0).all()  # (t_{n+k} = 19: t_n = 0, s = 0)
    top = s[:400]
    assert top.min() == 0 and top.max() == 979 and len(set(top.tolist())) > 40  # m ~ U{0..n}: every edge seen


def test_tcd_loss_is_the_reference_training_step():
    """The loss of rootonchair's `train_tcd_distill_sd_wds.py` step, written from it with the same draws."""
    method = TrajectoryConsistency(gamma=0.3)
    step, student, target, teacher = step_of(method)
    x0 = torch.randn(3, 4, 8, 8)
    loss = method.loss(step, x0, COND, UNCOND, Draws(5, 1, range(3)))
    (z_t, t), = student.calls
    (z_prev, t_n), = target.calls
    # the reference: the same draws (replayed per row) and formulas
    gens = Draws(5, 1, range(3)).generators
    pairs = [SkipSchedule(20, 1000).sample(1, g) for g in gens]
    t_ref = torch.cat([p[0] for p in pairs])
    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    w = torch.cat([UniformGuidance(2.0, 2.0).sample(1, "cpu", g) for g in gens]).view(-1, 1, 1, 1)
    index = (t_ref + 1) // 20 - 1
    end = torch.cat([torch.randint(0, int(i) + 1, (1,), generator=g) for i, g in zip(index, gens)])
    s = ((end + 1) * 20 - 1 - 20).clamp(min=0)
    a = AC.float()[t_ref].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.equal(t, t_ref) and torch.allclose(z_t, noisy, atol=1e-6)
    tn = (t_ref - 20).clamp(min=0)
    c, u = (Net(0.2, 0.2, 0.3)(noisy, t_ref, encoder_hidden_states=h["encoder_hidden_states"]).sample
            for h in (COND, UNCOND))
    x0c, x0u = ((noisy - (1 - a).sqrt() * o) / a.sqrt() for o in (c, u))
    pred_x0, pred_eps = x0c + w * (x0c - x0u), c + w * (c - u)
    ap = AC.float()[tn].view(-1, 1, 1, 1)
    x_prev = ap.sqrt() * pred_x0 + (1 - ap).sqrt() * pred_eps  # DDIMSolver.ddim_step
    assert torch.allclose(z_prev, x_prev, atol=1e-5) and torch.equal(t_n, tn)
    pred = reference_tcf(Net()(noisy, t_ref, encoder_hidden_states=COND["encoder_hidden_states"]).sample.double(),
                         noisy.double(), t_ref, s)
    tgt = reference_tcf(Net(0.25, 0.05, 0.1)(x_prev, tn, encoder_hidden_states=COND["encoder_hidden_states"]).sample
                        .double(), x_prev.double(), tn, s)
    torch.testing.assert_close(loss.double(), torch.mean((pred - tgt) ** 2), rtol=1e-4, atol=1e-7)


def test_tcd_students_sample_with_the_tcd_scheduler():
    teacher = type("T", (), {"scheduler": DDPM, "name": "t", "num_train_timesteps": 1000})()
    sampling = TrajectoryConsistency(gamma=0.3).sampling(teacher, 50, 10.0)
    assert type(sampling.scheduler) is TCDScheduler and sampling.plain and sampling.kwargs(4) == {"eta": 0.3}
    sampling.scheduler.set_timesteps(4)
    assert sampling.scheduler.timesteps.tolist() == [999, 759, 499, 259]  # (diffusers' default TCD path, k = 20)


# ------------------------------------------------------------------------------------------------------------ PCM
def reference_edges(num_ddim: int, phases: int) -> list[int]:
    """PCM's `DDIMSolver.ddim_style_multiphase_pred`: the edge timesteps ddim_timesteps_prev[floor(linspace)]."""
    ddim_ts = (np.arange(1, num_ddim + 1) * (1000 // num_ddim)).round() - 1
    prev = np.asarray([0] + ddim_ts[:-1].tolist())
    return prev[np.floor(np.linspace(0, num_ddim, phases, endpoint=False)).astype(int)].astype(int).tolist()


@pytest.mark.parametrize("n,m", [(50, 1), (50, 2), (50, 4), (50, 8), (40, 4), (40, 8)])
def test_pcm_phase_edges_are_the_official_ones(n, m):
    assert phase_edges(n, 1000 // n, m) == reference_edges(n, m)


def test_pcm_sampler_lands_on_every_edge_with_a_ddim_step():
    edges = phase_edges(50, 20, 4)
    assert sampler_timesteps(4, edges, 999) == [999, 739, 499, 239]
    assert sampler_timesteps(2, edges, 999) == [999, 499] and sampler_timesteps(1, edges, 999) == [999]
    assert set(edges[1:]) <= set(sampler_timesteps(8, edges, 999))
    # the training map x_t -> x_edge is TCDScheduler's eta = 0 step and DDIMScheduler's step to the edge
    z, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    tcd = TCDScheduler.from_config(DDPM.config)
    tcd.set_timesteps(timesteps=[739, 499])
    ours = trajectory_fn(schedule(), out, z, torch.tensor([739]), torch.tensor([499]))
    torch.testing.assert_close(ours, tcd.step(out, 739, z, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)
    dd = DDIMScheduler.from_config(DDPM.config, set_alpha_to_one=False, clip_sample=False, timestep_spacing="trailing")
    dd.set_timesteps(2)  # trailing: [999, 499]
    ours = trajectory_fn(schedule(), out, z, torch.tensor([999]), torch.tensor([499]))
    torch.testing.assert_close(ours, dd.step(out, 999, z, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)


def test_pcm_target_is_the_teacher_point_on_an_edge_and_the_target_network_at_the_same_edge_elsewhere():
    method = PhasedConsistency(phases=4)
    for seed in range(12):
        step, student, target, teacher = step_of(method)
        x0 = torch.randn(3, 4, 8, 8)
        loss = method.loss(step, x0, COND, UNCOND, Draws(seed, 0, range(3)))
        (z_t, t), = student.calls
        (z_prev, t_n), = target.calls
        edges = torch.tensor(reference_edges(50, 4))
        e = torch.stack([edges[edges <= tn].max() for tn in t_n])  # the official `max{j in edges: j <= index}`
        out_s = Net()(z_t, t, encoder_hidden_states=COND["encoder_hidden_states"]).sample
        pred = trajectory_fn(schedule(), out_s, z_t, t, e)
        out_t = Net(0.25, 0.05, 0.1)(z_prev, t_n, encoder_hidden_states=COND["encoder_hidden_states"]).sample
        tgt = trajectory_fn(schedule(), out_t, z_prev, t_n, e)
        on_edge = torch.isin(t_n, edges).view(-1, 1, 1, 1)  # c_skip = 1: the teacher's point itself
        tgt = torch.where(on_edge, z_prev, tgt)
        torch.testing.assert_close(loss, torch.mean((pred - tgt) ** 2), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------- DMD2
def test_dmd2_loss_gradient_is_the_normalised_score_difference():
    x0_g = torch.randn(2, 4, 8, 8, requires_grad=True)
    real, fake = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    dm_loss(x0_g, real, fake).backward()
    with torch.no_grad():  # DMD2 `compute_distribution_matching_loss`: p_real = x - x0_real, p_fake = x - x0_fake
        p_real, p_fake = x0_g - real, x0_g - fake
        grad = (p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True)
    torch.testing.assert_close(x0_g.grad, grad / x0_g.numel(), rtol=1e-5, atol=1e-9)
    x0_g.grad = None
    dm_loss(x0_g, real, real).backward()  # fake score = real score: nothing to move
    assert x0_g.grad.abs().max() == 0


def test_dmd2_generator_timesteps_and_sampler_are_the_official_ones():
    assert generator_timesteps(4, 1000) == [999, 749, 499, 249] and generator_timesteps(1, 1000) == [999]
    # DMD2's sampling loop (demo/text_to_image_sdxl.py::sample) against LCMScheduler with the same timesteps
    gen = Net(0.5, 0.1, 0.0)
    lcm = LCMScheduler.from_config(DDPM.config, original_inference_steps=1000, timestep_scaling=10.0)  # (as sampling() builds it)
    lcm.set_timesteps(timesteps=[999, 749, 499, 249])
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    noises = [torch.randn(1, 4, 8, 8, dtype=torch.float64) for _ in range(3)]
    ours, ref = x.clone(), x.clone()
    for i, t in enumerate([999, 749, 499, 249]):
        out = gen(ours, torch.tensor([t]), encoder_hidden_states=torch.zeros(1, 1, 1)).sample
        g = torch.Generator().manual_seed(0)
        res = lcm.step(out, t, ours, generator=g)  # (its re-noising draws from g; ours below uses `noises`)
        denoised = res.denoised
        a = AC[t]
        x0 = (ref - (1 - a).sqrt() * gen(ref, torch.tensor([t]), encoder_hidden_states=torch.zeros(1, 1, 1)).sample) / a.sqrt()
        torch.testing.assert_close(denoised, x0, rtol=1e-5, atol=1e-6)  # LCM's c_skip ~ 0 at these t
        if i < 3:
            nxt = [749, 499, 249][i]
            ref = AC[nxt].sqrt() * x0 + (1 - AC[nxt]).sqrt() * noises[i]
            ours = AC[nxt].sqrt() * denoised + (1 - AC[nxt]).sqrt() * noises[i]


def test_dmd2_step_trains_the_fake_score_r_times_per_generator_step():
    method = DistributionMatching(fake_updates=3, fake_lr=1e-3, fake_weight_decay=0.0, generator_steps=4,
                                  min_t=0.02, max_t=0.98, fake_max_grad_norm=10.0)
    step, student, target, teacher = step_of(method, w=(0.75, 0.75))
    fake = Net(0.1, 0.1, 0.1)
    opt = torch.optim.SGD(fake.parameters(), lr=0.1)
    updates = []

    def update(name, loss):
        updates.append(name)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step.auxiliary, step.update = {"fake": fake}, update
    x0 = torch.randn(3, 4, 8, 8)
    draws = Draws(1, 0, range(3))
    loss = method.loss(step, x0, COND, UNCOND, draws)
    loss.backward()
    assert updates == ["fake"] * 3 and student.a.grad is not None and teacher.a.grad is None
    # the generator's training input: its own backward simulation at the k-th of [999, 749, 499, 249]
    ts = [c[1][0].item() for c in student.calls]
    assert ts[-1] in (999, 749, 499, 249) and set(ts) <= {999, 749, 499, 249}


def test_dmd2_backward_simulation_starts_from_pure_noise_at_k_0():
    method = DistributionMatching(fake_updates=1, fake_lr=1e-3, fake_weight_decay=0.0, generator_steps=4,
                                  min_t=0.02, max_t=0.98, fake_max_grad_norm=10.0)
    step, student, *_ = step_of(method)
    noise = torch.randn(64, 4, 2, 2)
    draws = Draws(2, 0, range(64))
    x, t = method.generator_input(step, noise, None, {"encoder_hidden_states": torch.randn(64, 4, 8)}, draws)
    first = t == 999
    assert first.any() and (~first).any() and torch.equal(x[first], noise[first])
    assert set(t.tolist()) == {999, 749, 499, 249}
