#!/usr/bin/env bash
# Builds tiny-teacher recipes on a CUDA machine, in parallel, and measures each (DDIM-50 adherence per w, VAE
# reconstructions, sample grids). Measured on one H200 (2026-11-26): the tiny models are host-bound there --
# the UNet stage ran ~12 steps/s at batch 512 whether one build or two ran at once, the VAE stage ~30 steps/s
# at batch 128, and writing 60k images took ~100 s -- so size LIMIT from those rates. A build killed by LIMIT
# keeps its stages in /tmp/teachers/NAME.partial and continues from them when run again on the same machine.
# Run from the repository root; packages the image lacks come as wheels (see scripts/gpu_bench.sh):
#   WHEELS=.gpu/wheels OUT=/tmp/out bash scripts/gpu_teacher.sh NAME="overrides ..." [NAME="overrides ..."]
set -uo pipefail
WHEELS=${WHEELS:-.gpu/wheels}
OUT=${OUT:-/tmp/gpu_teacher}
LIMIT=${LIMIT:-480}
mkdir -p "$OUT"
if ! python3 -c "import diffusers, hydra, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=$PWD MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
pids=()
for spec in "$@"; do
  name=${spec%%=*}; overrides=${spec#*=}
  # shellcheck disable=SC2086
  timeout "$LIMIT" python3 -c "from lcm_exp.teachers.tiny import main; main()" --out "/tmp/teachers/$name" \
      --samples-dir "/tmp/teachers/${name}_samples" tracking.enabled=false teacher.cache_dir="/tmp/cache_$name" \
      $overrides > "$OUT/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; echo "build $pid exit $?"; done
for spec in "$@"; do
  name=${spec%%=*}
  echo "=== $name"; grep -E "^(adherence|vae_rec|built)" "$OUT/$name.log" | grep -E "/all|built|shape|position" | head -30
  [[ -d /tmp/teachers/$name ]] && tar -C /tmp/teachers -czf "$OUT/$name.tgz" "$name" "${name}_samples"
done
