"""`lcm-exp-bench`: our training step, built by the runner from every config group, against the reference step
of diffusers' `train_lcm_distill_sd_wds.py` (`reference`, which shares no code with ours), timed side by side
(`measure`). It sits on top, beside the runner."""
