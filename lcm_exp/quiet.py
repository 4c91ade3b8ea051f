"""Library messages a user of lcm_exp cannot act on, dropped at the logger that emits them.

- transformers, when diffusers' pipeline modules import `CLIPImageProcessor` / `SiglipImageProcessor` without
  torchvision installed, warns that it falls back to the PIL image processors. Our pipelines never run an image
  processor (no safety checker, no IP-Adapter), so installing torchvision would change no output.

Only these messages are dropped, by their text; every other warning of these loggers still shows.
"""
from __future__ import annotations

import logging

DROPPED = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
}


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def install() -> None:
    """Adds the filters (once per logger)."""
    for name, fragments in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(fragments))
