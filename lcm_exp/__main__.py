"""`python -m lcm_exp [overrides]` is `lcm-exp [overrides]`, so that launchers that start a module run it:
`torchrun --nproc_per_node 8 -m lcm_exp ...`, `accelerate launch -m lcm_exp ...`."""
from .cli import train

if __name__ == "__main__":
    train()
