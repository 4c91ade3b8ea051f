"""The attention kernel's P-buffer reuse, measured: the reference, ours, and ours with the pool off, interleaved
in one process by lcm-exp-bench's loop (the pool is not a config switch, so it is not a bench.ablate name).

    OMP_NUM_THREADS=2 python scripts/bench_p_reuse.py bench.rounds=10 [more bench overrides]
"""
import statistics
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lcm_exp import attention
from lcm_exp.bench import Ours, Reference, Setup, time_interleaved
from lcm_exp.config import register


class WithoutReuse(Ours):
    def step(self, generator):
        attention._P_BUFFERS.max_bytes = 0  # every buffer given back is dropped at once
        try:
            return super().step(generator)
        finally:
            attention._P_BUFFERS.max_bytes = attention.MAX_SCORE_BYTES


def main():
    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=sys.argv[1:])
    s = Setup(cfg)
    paths = [Reference(s), Ours(s), WithoutReuse(s, cfg.copy(), name="ours_without_reuse")]
    b = cfg.bench
    times, _ = time_interleaved(paths, s.acc.device, torch.Generator().manual_seed(0), b.warmup, b.rounds,
                                b.steps_per_round)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(" ".join(f"{k} {v:.1f} ms ({med['reference'] / v:.3f}x)" for k, v in med.items()))


if __name__ == "__main__":
    main()
