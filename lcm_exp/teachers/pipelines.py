"""The diffusers pipelines around a teacher's frozen components: the one that samples the teacher with its own
solvers, the one that samples a student (validation, evaluation), and the one an export saves. SD-1.x/2.x
teachers get `StableDiffusionPipeline` / `LatentConsistencyModelPipeline`; SDXL-shaped ones (a second text
encoder) `StableDiffusionXLPipeline`, which feeds the w embedding itself when the UNet takes it."""
from __future__ import annotations


def pipeline_parts(teacher):
    """(the teacher's frozen pipeline components, the teacher's pipeline class, the LCM pipeline class)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if getattr(teacher, "text_encoder_2", None) is not None:  # SDXL: its pipeline feeds the w embedding too
        parts = dict(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                     text_encoder_2=teacher.text_encoder_2, tokenizer_2=teacher.tokenizer_2,
                     force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt)
        return parts, StableDiffusionXLPipeline, StableDiffusionXLPipeline
    parts = dict(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return parts, StableDiffusionPipeline, LatentConsistencyModelPipeline


def student_pipeline(teacher, unet, scheduler, plain: bool = False):
    """The diffusers pipeline that samples a student with `scheduler`: the LCM pipeline when the student takes w
    (time_cond_proj_dim); the teacher's own pipeline for a student without a w input (LCM-LoRA) and with `plain`
    (a sampler that takes `eta` or explicit timesteps: the teacher's pipeline passes them, and feeds the w
    embedding from guidance_scale - 1 as the LCM pipeline does)."""
    parts, teacher_cls, lcm_cls = pipeline_parts(teacher)
    cls = lcm_cls if unet.config.time_cond_proj_dim is not None and not plain else teacher_cls
    pipe = cls(unet=unet, scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_pipeline(teacher, unet, scheduler, plain: bool = False):
    """A diffusers pipeline around `unet` with the teacher's other components in fp32 (as loaded, not the copies
    training cast to bf16/fp16): LatentConsistencyModelPipeline (SD 1/2; `plain`: StableDiffusionPipeline, for a
    sampler that takes `eta` or explicit timesteps), StableDiffusionXLPipeline (SDXL, which feeds the w embedding
    itself when the UNet has time_cond_proj_dim)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    vae = teacher.vae  # (never cast: fp32)
    if getattr(teacher, "text_encoder_2", None) is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=teacher.fp32("text_encoder"),
                                         text_encoder_2=teacher.fp32("text_encoder_2"), tokenizer=teacher.tokenizer,
                                         tokenizer_2=teacher.tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt)
    cls = StableDiffusionPipeline if plain else LatentConsistencyModelPipeline
    return cls(vae=vae, text_encoder=teacher.fp32("text_encoder"), tokenizer=teacher.tokenizer, unet=unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def lora_pipeline_class(teacher):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if getattr(teacher, "text_encoder_2", None) is not None else StableDiffusionPipeline
