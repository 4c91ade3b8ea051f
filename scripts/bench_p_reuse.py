"""The attention kernel's P-buffer reuse, measured: the reference, ours, and ours with the pool off, interleaved
in one process as lcm-exp-bench does (the pool is not a config switch, so it is not a bench.ablate name).

    OMP_NUM_THREADS=2 python scripts/bench_p_reuse.py [bench overrides, e.g. trainer.batch_size=16]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lcm_exp import attention
from lcm_exp.bench import Ours, Reference, Setup
from lcm_exp.config import register


class WithoutReuse(Ours):
    def step(self, generator):
        attention._P_BUFFERS.max_bytes = 0  # every buffer given back is dropped at once
        try:
            return super().step(generator)
        finally:
            attention._P_BUFFERS.max_bytes = attention.MAX_SCORE_BYTES


def main(rounds: int = 10, steps_per_round: int = 3):
    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=sys.argv[1:])
    s = Setup(cfg)
    paths = [Reference(s), Ours(s), WithoutReuse(s, cfg.copy(), name="ours_without_reuse")]
    gen = torch.Generator().manual_seed(0)
    for p in paths:
        for _ in range(2):
            p.step(gen)
    times = {p.name: [] for p in paths}
    for r in range(rounds):
        for p in paths if r % 2 == 0 else paths[::-1]:
            p.activate()
            for _ in range(steps_per_round):
                t0 = time.perf_counter()
                p.step(gen)
                times[p.name].append(time.perf_counter() - t0)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    ref = med["reference"]
    print(" ".join(f"{k} {v:.1f} ms ({ref / v:.3f}x)" for k, v in med.items()))


if __name__ == "__main__":
    main()
