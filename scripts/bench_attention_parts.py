"""Two parts of the attention kernel that are not config switches (so not bench.ablate names), measured: the
reference, ours, ours with the P-buffer pool off, and ours with softmax's max pass always made (no exp2 pass),
interleaved in one process by lcm-exp-bench's loop.

    OMP_NUM_THREADS=2 python scripts/bench_attention_parts.py bench.rounds=10 [more bench overrides]
"""
import statistics
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lcm_exp import attention
from lcm_exp.bench import Ours, Reference, Setup, time_interleaved
from lcm_exp.config import register


class Without(Ours):
    """Our step with `owner.attr` set to `value` while it runs."""

    def __init__(self, s, cfg, name: str, owner, attr: str, value):
        super().__init__(s, cfg, name=name)
        self.owner, self.attr, self.value = owner, attr, value

    def step(self, generator):
        keep = getattr(self.owner, self.attr)
        setattr(self.owner, self.attr, self.value)
        try:
            loss = super().step(generator)
            self.drain()  # (overlap_frozen's next teacher pass runs with the setting too)
            return loss
        finally:
            setattr(self.owner, self.attr, keep)


def main():
    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=sys.argv[1:])
    s = Setup(cfg)
    paths = [Reference(s), Ours(s),
             Without(s, cfg.copy(), "ours_without_p_reuse", attention._P_BUFFERS, "max_bytes", 0),  # P is dropped
             Without(s, cfg.copy(), "ours_without_exp2_pass", attention, "UNSHIFTED_MIN_KEYS", float("inf"))]
    b = cfg.bench
    times, _ = time_interleaved(paths, s.acc.device, torch.Generator().manual_seed(0), b.warmup, b.rounds,
                                b.steps_per_round)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(" ".join(f"{k} {v:.1f} ms ({med['reference'] / v:.3f}x)" for k, v in med.items()))


if __name__ == "__main__":
    main()
