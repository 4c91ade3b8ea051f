"""The speed switches of `conf/trainer/` (torchtitan's "parallelize" seam: applied to the networks once, the
loop unchanged): the attention kernel, channels-last memory, activation checkpointing and torch.compile.
None changes what a step computes beyond floating-point rounding; `lcm-exp-bench` measures each."""
from __future__ import annotations

import torch

ATTENTION_MODES = ("sdpa", "xformers")  # trainer.attention


def set_attention(unet, mode: str) -> None:
    """`sdpa`: torch's scaled_dot_product_attention (diffusers' `AttnProcessor2_0`, its default); `xformers`:
    xformers' memory-efficient kernel (CUDA; `pip install -e '.[gpu]'`). Only layers that run plain dot-product
    attention are switched (a layer diffusers gave another processor, e.g. added K/V, keeps it)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    if mode not in ATTENTION_MODES:
        raise ValueError(f"trainer.attention={mode!r}: use one of {', '.join(ATTENTION_MODES)}")
    if mode == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        return
    processor = AttnProcessor2_0()
    for m in unet.modules():
        if isinstance(m, Attention) and type(m.processor) in (AttnProcessor, XFormersAttnProcessor):
            m.set_processor(processor)


def apply(trainer, student, frozen: list) -> None:
    """Channels-last and the attention kernel on every UNet the step runs (`frozen`: the teacher's and the
    target's), activation checkpointing on the trained one."""
    for unet in [student.unet, *frozen]:
        if isinstance(unet, torch.nn.Module):  # (LCM-LoRA's teacher is the student with its adapters off)
            if trainer.channels_last:
                unet.to(memory_format=torch.channels_last)
            set_attention(unet, trainer.attention)
    if trainer.gradient_checkpointing:
        student.unet.enable_gradient_checkpointing()


def refuse_compile_on_cpu(compile: bool, device: torch.device) -> None:
    if compile and device.type == "cpu":
        from ..config import ConfigError

        raise ConfigError(
            "trainer.compile=true on a CPU is refused: torch's Inductor CPU backend (torch 2.13) computes wrong "
            "gradients for the diffusers UNet here (84 of the tiny UNet's 208 parameters get zero; eager and "
            "aot_eager agree with float64; docs/performance.md). Use trainer.compile=false on a CPU; on a GPU "
            "tests/test_gpu.py checks the compiled step against eager.")


def compiled(module, enabled: bool):
    """`trainer.compile`: the module compiled with torch.compile (refused on a CPU when the trainer is built)."""
    return torch.compile(module) if enabled and isinstance(module, torch.nn.Module) else module
