"""Does torch.compile give the UNet's eager gradients? One forward/backward of the tiny random teacher's UNet,
eager against torch.compile(backend=...), on this machine (CPU or GPU). docs/performance.md has what it printed.

    python scripts/check_compile_grads.py inductor     # or aot_eager, eager
"""
import copy
import sys

import torch

from lcm_exp.teachers.tiny_random import DEFAULT_ARCH, build_components

backend = sys.argv[1] if len(sys.argv) > 1 else "inductor"
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
eager = build_components(DEFAULT_ARCH)["unet"].float().train().to(device)
other = copy.deepcopy(eager)
compiled = torch.compile(other, backend=backend)
x, t = torch.randn(4, 4, 4, 4, device=device), torch.tensor([999, 500, 100, 10], device=device)
h = torch.randn(4, 77, eager.config.cross_attention_dim, device=device)


def grads(call, module):
    call(x, t, encoder_hidden_states=h).sample.pow(2).mean().backward()
    return {n: p.grad for n, p in module.named_parameters()}


ga, gb = grads(eager, eager), grads(compiled, other)
worst = max(((gb[n] - ga[n]).abs().max().item() / (ga[n].abs().max().item() + 1e-30), n) for n in ga)
zero = sum(1 for n in gb if gb[n].abs().max() == 0 < ga[n].abs().max())
print(f"torch {torch.__version__} on {device}, backend {backend}: largest gradient error {worst[0]:.2e} "
      f"(relative to the parameter's largest eager gradient) at {worst[1]}; all-zero compiled gradients: "
      f"{zero} of {len(ga)} parameters")
