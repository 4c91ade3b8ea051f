#!/usr/bin/env bash
# The README's tour, timed: each command in a fresh folder, one after the other, with the venv active.
#   bash scripts/tour.sh [sweeps]   # `sweeps`: also every study of sweeps/ serially (their files' Cost lines)
set -uo pipefail
export MLFLOW_DISABLE_TELEMETRY=true
D=$(mktemp -d /tmp/lcm-tour.XXXX); cd "$D"; echo "folder $D, $(date -u), $(nproc) cores"
t() {  # runs a command, prints its wall time and exit code; its output goes to a log file in the folder
  local s=$(date +%s.%N); "$@" > "log_$(date +%s%N).txt" 2>&1; local rc=$?
  printf '%6.1f s  rc=%d  %s\n' "$(echo "$(date +%s.%N) - $s" | bc)" $rc "$*"
}
t lcm-exp
t lcm-exp loss=l2 skip.k=10 guidance.w_max=6
t lcm-exp +sweep=loss hydra/launcher=joblib hydra.launcher.n_jobs=2
PARENT=$(python - <<'PY'
from mlflow.tracking import MlflowClient
c = MlflowClient("sqlite:///mlflow.db")
runs = c.search_runs([c.get_experiment_by_name("lcm-distill").experiment_id])
print(next(r.info.run_id for r in runs if r.data.tags.get("lcm_exp.sweep") == "parent"))
PY
)
t lcm-exp-report parent=$PARENT
if [[ ${1:-} == sweeps ]]; then
  for s in skip_k loss guidance ema solver; do t lcm-exp +sweep=$s; done
fi
