"""lcm_exp: latent consistency distillation as an experiment platform."""
__version__ = "0.1.0"

from . import quiet as _quiet  # noqa: E402

_quiet.install()
