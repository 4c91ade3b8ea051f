"""Issue 7 parts against closed forms: LCM-LoRA (teacher pass = base model, export reloads exactly, no w input),
stochastic depth (whole blocks dropped in training, none in eval), consistency training's target."""
from __future__ import annotations

import copy

import pytest
import torch

from lcm_exp.teachers.tiny_layouts import build
from parts import part


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A factory of fresh teachers loaded from one tiny SD-1.5-shaped folder."""
    from lcm_exp.teachers import load_teacher

    path = build("sd15", tmp_path_factory.mktemp("layout") / "sd15")
    return lambda: load_teacher("sd15", str(path), None, None, None, True)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([499, 999]), torch.randn(2, 8, 32, generator=g)


def test_lora_teacher_pass_is_the_base_model_and_export_reloads_exactly(teacher, tmp_path):
    from diffusers import DiffusionPipeline

    from lcm_exp.distill.methods import Method
    from lcm_exp.export.exporter import export

    t = teacher()
    base = copy.deepcopy(t.unet).eval()
    s = part("student", "lora", lora_rank=4, lora_alpha=4, runtime={"teacher": t})
    assert s.w_embedding_dim == 0 and not s.ema_target and s.unet.config.time_cond_proj_dim is None
    assert all("lora" in n for n, p in s.unet.named_parameters() if p.requires_grad)
    torch.manual_seed(0)
    for n, p in s.unet.named_parameters():  # as if trained
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    s.unet.eval()
    z, tt, c = inputs()
    with torch.no_grad():
        want = base(z, tt, encoder_hidden_states=c).sample
        assert torch.allclose(s.teacher_unet(z, tt, encoder_hidden_states=c).sample, want, atol=1e-6)
        student = s.unet(z, tt, encoder_hidden_states=c).sample
        assert (student - want).abs().max() > 1e-2  # adapters on again after the teacher pass
        merged = s.inference_unet(s.unet)(z, tt, encoder_hidden_states=c).sample
        assert torch.allclose(merged, student, atol=1e-5)
    out = export(t, s, s.unet, tmp_path / "export", num_steps=50, sampling=Method().sampling(t, 50, 10.0))
    pipe = DiffusionPipeline.from_pretrained(t.path)
    pipe.load_lora_weights(out)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(z, tt, encoder_hidden_states=c).sample, student, atol=1e-5)


def test_stochastic_depth_drops_whole_blocks_in_training_only(teacher):
    from lcm_exp.students import DroppableBasicTransformerBlock, DroppableResnetBlock2D

    plain = part("student", "full", runtime={"teacher": teacher()}).unet.eval()
    s = part("student", "full", stochastic_depth=0.5, runtime={"teacher": teacher()})
    blocks = [m for m in s.unet.modules() if isinstance(m, (DroppableResnetBlock2D, DroppableBasicTransformerBlock))]
    assert len(blocks) >= 4 and any(isinstance(b, DroppableBasicTransformerBlock) for b in blocks)
    assert s.unet.state_dict().keys() == plain.state_dict().keys()  # save/load layout unchanged
    z, tt, c = inputs()
    w = torch.zeros(2, 256)
    with torch.no_grad():
        s.unet.eval()  # no drops at inference: the same function as without stochastic depth
        assert torch.equal(s.unet(z, tt, encoder_hidden_states=c, timestep_cond=w).sample,
                           plain(z, tt, encoder_hidden_states=c, timestep_cond=w).sample)
        s.unet.train()
        block = blocks[0]
        block.drop_prob = 0.999999
        h = torch.randn(2, block.in_channels, 8, 8)
        assert block(h, torch.randn(2, block.time_emb_proj.in_features)) is h  # dropped: output = input
        block.drop_prob = 0.5
        torch.manual_seed(0)
        outs = {s.unet(z, tt, encoder_hidden_states=c, timestep_cond=w).sample.sum().item() for _ in range(6)}
        assert len(outs) > 1  # different blocks dropped from call to call


def test_consistency_training_target_is_the_closed_form():
    """CT: the target is taken at z_{t_n} = √ᾱ_{t_n} z + √(1−ᾱ_{t_n}) ε with the ε of z_{t_{n+k}}; no teacher call."""
    from lcm_exp.distill.guidance import UniformGuidance
    from lcm_exp.distill.step import Step
    from lcm_exp.distill.losses import l2
    from lcm_exp.distill.methods import ConsistencyTraining
    from lcm_exp.distill.schedules import VPSchedule
    from lcm_exp.distill.skip import SkipSchedule

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))
            self.seen = []

        def forward(self, z, t, timestep_cond=None, **_):
            self.seen.append((z.detach().clone(), t.clone()))
            return type("Out", (), {"sample": self.scale * z})()

    def no_teacher(*_, **__):
        raise AssertionError("CT must not call the teacher")

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ac = torch.cumprod(1 - betas, 0)
    student, target = Net(), Net()
    skip = SkipSchedule(20, 1000)
    lcd = Step(student=student, target=target, teacher=no_teacher, schedule=VPSchedule(ac, "epsilon"), solver=None,
              skip=skip, guidance=UniformGuidance(3, 3), distance=l2, method=ConsistencyTraining(from_scratch=False))
    from lcm_exp.distill.draws import Draws, row_seed

    x0 = torch.randn(3, 4, 8, 8)
    loss = lcd.loss(x0, {}, {}, Draws(7, 0, range(3)))
    t, t_prev, eps = [], [], []
    for row in range(3):  # replay each row's draws from its own generator: (t_{n+k}, t_n), then ε
        g = torch.Generator().manual_seed(row_seed(7, 0, row))
        pair = skip.sample(1, g)
        t.append(pair[0]), t_prev.append(pair[1]), eps.append(torch.randn(x0.shape[1:], generator=g))
    t, t_prev, eps = torch.cat(t), torch.cat(t_prev), torch.stack(eps)
    a, ap = ac[t].view(-1, 1, 1, 1), ac[t_prev].view(-1, 1, 1, 1)
    (z_online, t_online), = student.seen
    (z_target, t_target), = target.seen
    assert torch.equal(t_online, t) and torch.equal(t_target, t_prev)
    assert torch.allclose(z_online, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    assert torch.allclose(z_target, ap.sqrt() * x0 + (1 - ap).sqrt() * eps, atol=1e-6)
    assert loss.requires_grad and torch.isfinite(loss)
