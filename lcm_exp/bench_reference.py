"""The reference step of `lcm-exp-bench`: diffusers' `train_lcm_distill_sd_wds.py` step, written the way the script
writes it (VAE, tokenizer and text encoder every step, two teacher passes, fp32 teacher and target, torch's
default AdamW, a per-parameter EMA loop, diffusers' SDPA attention)."""
from __future__ import annotations

import copy

import torch

from .attention import set_attention
from .executors import use_threads
from .guidance import guidance_embedding
from .lcd import boundary_scalings, x0_and_eps


def _activate(path, unets, attention: str, threads: int) -> None:
    """The paths share UNets, so each runs with its own attention processors; switching walks every module,
    so it happens only when another path ran last (`Setup.active`). Each path's step starts with its own
    OpenMP thread count (overlap_frozen halves it), set here, outside the timed steps."""
    use_threads(threads)
    if path.s.active is not path:
        for m in unets:
            set_attention(m, attention)
        path.s.active = path


class Reference:
    """The diffusers script's step, written the way the script writes it."""

    name = "reference"

    def __init__(self, s):
        self.s = s
        self.target = copy.deepcopy(s.student.unet).requires_grad_(False)  # fp32, like the script's target_unet
        self.optimizer = torch.optim.AdamW(s.student.unet.parameters(), lr=s.lr)  # torch defaults
        self.uncond = s.teacher.encode_prompts([""] * s.batch_size)["encoder_hidden_states"]  # once, as the script

    def own(self) -> list:
        """The tensors this path keeps beyond the shared networks: target and optimiser state."""
        return [*self.target.parameters(), *(t for st in self.optimizer.state.values() for t in st.values()
                                             if torch.is_tensor(t))]

    def exclusive(self, other) -> list:
        """Tensors only this path holds (subtracted from the other path's peak memory)."""
        shared_teacher = other.teacher.unet is self.s.teacher.unet
        return self.own() + ([] if shared_teacher else list(self.s.teacher.unet.parameters()))

    def activate(self) -> None:
        """Puts diffusers' default SDPA processors on the UNets it shares with ours (untimed: see run_bench)."""
        _activate(self, (self.s.student.unet, self.s.teacher.unet, self.target), "sdpa", self.s.threads)

    def drain(self) -> None:
        """(Nothing of this path runs after its step returns.)"""

    def step(self, generator):
        s, acc = self.s, self.s.acc
        unet, teacher_unet, ac = s.student.unet, s.teacher.unet, s.alphas_cumprod
        self.activate()
        with acc.autocast():
            latents = s.teacher.vae.encode(s.pixels.to(s.teacher.vae.dtype)).latent_dist.sample(generator=generator)
            latents = latents * s.teacher.vae.config.scaling_factor
            prompt_embeds = s.teacher.text_encoder(s.tokenize(s.captions))[0]  # the script's encode_prompt
            bsz = latents.shape[0]
            index = torch.randint(0, s.skip.num_steps, (bsz,), generator=generator)
            start_timesteps = s.skip.timesteps[index].to(latents.device)
            timesteps = (start_timesteps - s.skip.k).clamp(min=0)
            c_skip_start, c_out_start = [x.view(-1, 1, 1, 1) for x in boundary_scalings(start_timesteps)]
            c_skip, c_out = [x.view(-1, 1, 1, 1) for x in boundary_scalings(timesteps)]
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            a = ac[start_timesteps].view(-1, 1, 1, 1)
            noisy_model_input = a.sqrt() * latents + (1 - a).sqrt() * noise
            w = s.guidance.sample(bsz, latents.device, generator)
            w_embedding = guidance_embedding(w, s.student.w_embedding_dim)
            w = w.view(-1, 1, 1, 1)
            noise_pred = unet(noisy_model_input, start_timesteps, timestep_cond=w_embedding,
                              encoder_hidden_states=prompt_embeds).sample
            pred_x_0, _ = x0_and_eps(noise_pred, start_timesteps, noisy_model_input, ac, s.prediction_type)
            model_pred = c_skip_start * noisy_model_input + c_out_start * pred_x_0
            with torch.no_grad():
                cond_out = teacher_unet(noisy_model_input, start_timesteps, encoder_hidden_states=prompt_embeds).sample
                cond_x0, cond_eps = x0_and_eps(cond_out.float(), start_timesteps, noisy_model_input, ac, s.prediction_type)
                uncond_out = teacher_unet(noisy_model_input, start_timesteps, encoder_hidden_states=self.uncond).sample
                uncond_x0, uncond_eps = x0_and_eps(uncond_out.float(), start_timesteps, noisy_model_input, ac,
                                                   s.prediction_type)
                pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)
                pred_noise = cond_eps + w * (cond_eps - uncond_eps)
                a_prev = ac[timesteps].view(-1, 1, 1, 1)
                x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_noise  # DDIMSolver.ddim_step
                target_noise_pred = self.target(x_prev.float(), timesteps, timestep_cond=w_embedding,
                                                encoder_hidden_states=prompt_embeds).sample
                pred_x_0, _ = x0_and_eps(target_noise_pred, timesteps, x_prev, ac, s.prediction_type)
                target = c_skip * x_prev + c_out * pred_x_0
            loss = s.distance(model_pred.float(), target.float())
            acc.backward(loss)
            acc.clip_grad_norm_(unet.parameters(), s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # the script's update_ema: one parameter at a time
            for targ, src in zip(self.target.parameters(), unet.parameters()):
                targ.detach().mul_(s.decay).add_(src, alpha=1 - s.decay)
        return loss.detach()
