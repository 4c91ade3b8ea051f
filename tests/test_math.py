"""The LCD math against closed forms and against diffusers' own implementations."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lcm_exp.distill import losses, solvers
from lcm_exp.distill.ema import EMA
from lcm_exp.distill.guidance import UniformGuidance, guidance_embedding
from lcm_exp.distill.step import boundary_scalings, x0_and_eps
from lcm_exp.distill.schedules import VPSchedule
from lcm_exp.distill.skip import SkipSchedule


def sd_scheduler(cls=DDPMScheduler, **kw):
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               clip_sample=False, **kw)


def test_boundary_conditions():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 999]), sigma_data=0.5, timestep_scaling=10.0)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    st = 10.0 * 19
    assert c_skip[1].item() == pytest.approx(0.25 / (st ** 2 + 0.25), rel=1e-6)
    assert c_out[1].item() == pytest.approx(st / math.sqrt(st ** 2 + 0.25), rel=1e-6)
    assert c_skip[2] < 1e-5 and c_out[2] > 0.999999


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_and_eps_invert_add_noise(prediction_type):
    sched = sd_scheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 19, 250, 500, 800, 999])
    z = sched.add_noise(x0, eps, t)
    out = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, t)
    x0_hat, eps_hat = x0_and_eps(out, t, z, sched.alphas_cumprod, prediction_type)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)


def test_ddim_step_matches_diffusers_ddim_scheduler():
    k = 20
    ddim = sd_scheduler(DDIMScheduler, set_alpha_to_one=False)
    ddim.set_timesteps(1000 // k)
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ac = ddim.alphas_cumprod
    for t_int in (999, 519, 19):
        t = torch.tensor([t_int])
        denoise = lambda z_, t_: x0_and_eps(eps, t_, z_, ac, "epsilon")  # noqa: E731
        ours = solvers.ddim(denoise, z, t, (t - k).clamp(min=0), VPSchedule(ac, "epsilon"))
        ref = ddim.step(eps, t_int, z, eta=0.0).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_solvers_on_gaussian_data_closed_form():
    """x0 ~ N(0, s²): the exact ε-denoiser and the PF-ODE flow are known. All three solvers are consistent;
    second-order Heun is an order of magnitude closer than the first-order ones over one k = 20 step."""
    ac, s = sd_scheduler().alphas_cumprod.double(), 0.8

    def denoise(z, t):
        a = ac[t].view(-1, 1)
        eps = (1 - a).sqrt() * z / (a * s * s + 1 - a)
        return (z - (1 - a).sqrt() * eps) / a.sqrt(), eps

    z = torch.randn(4096, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, t_prev = torch.full((4096,), 599), torch.full((4096,), 579)  # one skip-step of k = 20
    sig = lambda t_: ((1 - ac[t_]) / ac[t_]).sqrt()  # noqa: E731
    exact = z / ac[599].sqrt() * ((s * s + sig(579) ** 2) / (s * s + sig(599) ** 2)).sqrt() * ac[579].sqrt()
    err = {name: (getattr(solvers, name)(denoise, z, t, t_prev, VPSchedule(ac, "epsilon")) - exact).abs().max().item()
           for name in ("ddim", "euler", "heun")}
    assert max(err.values()) < 2e-3, err
    assert err["heun"] < 0.2 * min(err["ddim"], err["euler"]), err


def test_guidance_embedding_matches_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 3.5, 7.0, 14.0])
    for dim in (256, 255):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), ref)


def test_uniform_guidance_range():
    w = UniformGuidance(3.0, 9.0).sample(10000, generator=torch.Generator().manual_seed(0))
    assert w.min() >= 3.0 and w.max() <= 9.0 and abs(w.mean().item() - 6.0) < 0.1


def test_losses():
    pred, target = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 1.0])
    c = 0.1
    expected = sum(math.sqrt(d * d + c * c) - c for d in (-0.5, 0.0, -3.0)) / 3
    assert losses.huber(pred, target, huber_c=c).item() == pytest.approx(expected, rel=1e-6)
    assert losses.l2(pred, target).item() == pytest.approx((0.25 + 0 + 9) / 3, rel=1e-6)
    # pseudo-Huber tends to L1 for large errors and to l2/(2c) for small ones
    assert losses.huber(torch.tensor([1e-2]), torch.tensor([0.0]), huber_c=1.0).item() == pytest.approx(0.5e-4, rel=1e-2)


def test_skip_schedule():
    sk = SkipSchedule(20, 1000)
    assert sk.num_steps == 50 and sk.timesteps[0] == 19 and sk.timesteps[-1] == 999
    t, t_prev = sk.sample(5000, torch.Generator().manual_seed(0))
    assert set(t.tolist()) <= set(sk.timesteps.tolist())
    assert torch.equal(t_prev, (t - 20).clamp(min=0)) and (t_prev == 0).any()
    assert SkipSchedule(1, 1000).timesteps.tolist() == list(range(1000))


def test_ema_update():
    online = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        online.weight.fill_(0.0)
    ema = EMA(online, decay=0.9, cast_to_mixed_precision=True)
    with torch.no_grad():
        online.weight.fill_(1.0)
    ema.update()
    ema.update()
    # θ⁻ = 0.9² · 0 + (1 − 0.9²) · 1
    torch.testing.assert_close(ema.target.weight, torch.full((1, 2), 1 - 0.81))
    assert not ema.target.weight.requires_grad


def test_frozen_networks_run_natively_only_when_wholly_low_precision():
    from lcm_exp.distill.step import native_dtype
    from lcm_exp.students import AdaptersDisabled

    lin = torch.nn.Linear(2, 2)
    assert native_dtype(lin) is None  # fp32: autocast as usual
    assert native_dtype(lin.to(torch.bfloat16)) == torch.bfloat16
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2).half(), torch.nn.Linear(2, 2))  # e.g. fp32 LoRA on fp16
    assert native_dtype(mixed) is None
    assert native_dtype(AdaptersDisabled(lin)) is None
