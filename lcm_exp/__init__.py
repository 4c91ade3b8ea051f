"""lcm_exp: latent consistency distillation as an experiment platform."""
__version__ = "0.1.0"
