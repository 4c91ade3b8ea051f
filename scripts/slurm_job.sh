#!/bin/bash
# A preemptible SLURM job that requeues itself (docs/scale-out.md, "Preemption through each launcher").
#   sbatch scripts/slurm_job.sh experiment=lcm_sd15 teacher.pretrained=/models/sd15 data.urls='/data/laion/{00000..01209}.tar'
# 120 s before the time limit (or at a preemption) SLURM sends SIGUSR1 to every task of the step (no `B:`):
# lcm-exp-launch forwards it to every rank, each checkpoints the same step, the launcher exits 75, srun passes
# 75 on (the highest task status), and the job requeues itself; the requeued job resumes with
# trainer.resume=latest. Any other status (0: done, 2: a configuration error, 1: a failure) ends the job.
#SBATCH --job-name=lcm-exp
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
export LCM_EXP_GRACE_S=${LCM_EXP_GRACE_S:-110}  # the launcher waits this long for every rank's checkpoint
srun --ntasks=1 lcm-exp-launch --standalone --nproc_per_node "${SLURM_GPUS_ON_NODE:-8}" trainer.resume=latest "$@"
code=$?
if [ "$code" -eq 75 ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
