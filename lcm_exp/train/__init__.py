"""The training machinery, below the runner and above the algorithm: the loop (`trainer`), the processes and
what they decide together (`ranks`, `fsdp`), the speed switches (`switches`), checkpoints and exact resume
(`checkpoint`), preemption signals (`preemption`), the logging window and progress bar (`progress`) and the
optimiser builders (`optim`, `conf/optim/`). It imports `config`, `distill` and `data`, never the tracking,
evaluation or export layers: the runner hands it a tracker and callbacks."""
