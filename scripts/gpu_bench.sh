#!/usr/bin/env bash
# On a lent GPU: (1) end-to-end jobs in fp16 and bf16 (the embedded default: train, validation, checkpoint,
# export, evaluation, then a plain-diffusers load of the export); (2) lcm-exp-bench on an SD-1.5-shaped teacher
# (random weights, built in memory) at 512 px (64x64 latents), batch 12, bf16 -- all speed switches on, then each
# one off in turn. E2E=0 skips (1); ONLY=e2e runs only (1).
# Run from the repository root on a CUDA machine; the packages the image lacks come as wheels:
#   WHEELS=.gpu/wheels OUT=/tmp/out bash scripts/gpu_bench.sh
# Build the wheels here first (.gpu is git-ignored: pass it to the device tool's `carry`):
#   pip download --no-deps -d .gpu/wheels diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 \
#       webdataset==1.0.2 braceexpand importlib_metadata
#   pip wheel --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
set -uo pipefail
WHEELS=${WHEELS:-.gpu/wheels}
OUT=${OUT:-/tmp/gpu_bench}
TEACHER=${TEACHER:-teacher=sd15_random}
EXTRA=${EXTRA:-trainer.batch_size=12 data.resolution=512 data.num_samples=12 trainer.mixed_precision=bf16}
mkdir -p "$OUT"
if ! python3 -c "import diffusers, hydra, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=$PWD MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
python3 scripts/check_compile_grads.py inductor 2>&1 | tail -1 | tee "$OUT/compile_grads.txt"  # (wrong on a CPU: docs/performance.md)
ONLY=${ONLY:-}  # e.g. ONLY="all_on compile": run only these configurations
e2e() {  # PRECISION: the main job end to end (no MLflow in the GPU image: tracking off), then load its export
  local p=$1 dir=/tmp/lcm_e2e_$1
  timeout ${RUN_LIMIT:-300} python3 -c "from lcm_exp.cli import train; train()" trainer.mixed_precision=$p \
      trainer.max_steps=50 trainer.checkpoint_every=25 tracking.enabled=false eval.fid=false \
      hydra.run.dir=$dir > "$OUT/e2e_$p.log" 2>&1
  local rc=$?
  python3 - "$dir/export" >> "$OUT/e2e_$p.log" 2>&1 <<'PY'
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1]).to("cuda")
img = pipe("a large red circle in the center on a white background", num_inference_steps=4, height=32, width=32,
           guidance_scale=8.0, output_type="np").images
print("export loads and samples:", img.shape, float(img.std()))
PY
  echo "e2e $p: train rc=$rc, export load rc=$?" | tee -a "$OUT/e2e.txt"
  grep -E "student \| 4 \|" "$OUT/e2e_$p.log" | head -1 | tee -a "$OUT/e2e.txt"
}
if [[ ${E2E:-1} == 1 ]]; then
  e2e fp16
  e2e bf16
fi
[[ $ONLY == e2e ]] && exit 0
run() {  # NAME OVERRIDES...
  local name=$1; shift
  [[ -n $ONLY && " $ONLY " != *" $name "* ]] && return
  echo "=== $name: $*"
  timeout ${RUN_LIMIT:-300} python3 -c "from lcm_exp.cli import bench; bench()" $TEACHER $EXTRA bench.rounds=3 \
      bench.steps_per_round=2 hydra.run.dir="/tmp/lcm_bench_runs/$name" "$@" > "/tmp/lcm_bench_$name.log" 2>&1
  local rc=$?
  { echo "=== $name: $*"; cat "/tmp/lcm_bench_$name.log"; } >> "$OUT/all.log"
  tail -5 "/tmp/lcm_bench_$name.log" | head -4
  [[ $rc == 0 ]] && echo "{\"config\": \"$name\", \"result\": $(tail -1 "/tmp/lcm_bench_$name.log")}" >> "$OUT/results.jsonl" \
                 || echo "$name failed (rc $rc)"
}
run all_on bench.flops=true
run compile trainer.compile=true
run no_precompute bench.cached=false
run no_batched_cfg trainer.batched_cfg=false
run fp32_teacher_and_target teacher.cast_to_mixed_precision=false ema.cast_to_mixed_precision=false
run no_fused_adamw optim.fused=false
run no_teacher_first trainer.teacher_first=false
run channels_last trainer.channels_last=true
run grad_checkpointing trainer.gradient_checkpointing=true
run methods "bench.methods=[tcd,pcm,dmd2,ct]"   # each method's step against LCD's, interleaved
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
print(f"{'config':<26}{'ref s/s':>9}{'ours s/s':>9}{'speedup':>8}{'ref MB':>9}{'ours MB':>9}")
for line in open(sys.argv[1]):
    r = json.loads(line); x = r["result"]
    print(f"{r['config']:<26}{x['reference_samples_per_s']:9.2f}{x['ours_samples_per_s']:9.2f}{x['speedup']:8.2f}"
          f"{x['reference_peak_mem_mb'] or 0:9.0f}{x['ours_peak_mem_mb'] or 0:9.0f}")
    if "ours_frac_of_bf16_peak" in x:
        print(f"  model TFLOP/step ref {x['reference_tflop_per_step']:.2f} ours {x['ours_tflop_per_step']:.2f}; "
              f"TFLOP/s ref {x['reference_tflop_per_s']:.0f} ours {x['ours_tflop_per_s']:.0f}; "
              f"of bf16 peak ref {x['reference_frac_of_bf16_peak']:.1%} ours {x['ours_frac_of_bf16_peak']:.1%}")
PY
