#!/usr/bin/env bash
# The GPU validation of issue 12, in one run on one H100/H200 (under 8 minutes):
#   1. the fused SAR kernel: invalid-pixel matrix, every input kind, the real scenes; timed against eager
#      torch and a device-to-device copy (bench/kernels.py);
#   2. the attention backends at ViT-B/16 224/512 px and padded BERT shapes, bf16, forward + backward, checked
#      against the float32 reference (bench/attention.py);
#   3. the `base` training step, plain and ZeRO-3 (one rank), eager and compiled, activation checkpointing off
#      and on, 224 and 512 px, at the largest batch that fits; MFU against spec and a measured matmul ceiling;
#      the top CUDA kernels of the plain 224 px step (bench/train_step.py --gpu).
# Full numbers go under $OUT (default runs/gpu_check); a short table is printed last.
#
#   bash bench/gpu_check.sh                     # on a GPU machine; prints "no GPU" and exits 0 elsewhere
#   GPU_CHECK_PLAN=tune bash bench/gpu_check.sh # the follow-up: kernel launch sweep (bench/kernels.py --tune);
#                                               # the 224 px step at batch 128: plain, plain with bf16 weights,
#                                               # ZeRO-3, ZeRO-3 with whole blocks persistent, and also with
#                                               # torch's linear instead of DeepSpeed's; each profiled
#   GPU_CHECK_PLAN=step bash bench/gpu_check.sh # the step only (the kernel checks and timing skipped): plain with
#                                               # bf16 weights, ZeRO-3 (a block at a time, then a module at a
#                                               # time: after and before issue 26's first pass; a block at a time
#                                               # in flat parameters, zero3_gather=flat, the default) and ZeRO-2 at
#                                               # batch 128 on the same card, ZeRO-3 under DeepCompile, then bf16
#                                               # weights and ZeRO-2 at their largest batch, then bf16 weights
#                                               # compiled; each profiled
#                                               # (the ZeRO cases with their Python calls by phase)
#
# The device machines lack deepspeed, omegaconf and their needs: put their wheels in .whl/ (see BENCHMARKS.md)
# and they are installed into /tmp/site first. The real scenes travel as bench/sentinel1_db.npy
# (`python bench/kernels.py --export-scenes` where rasterio is installed).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_BUDGET_S:-450}
PLAN=${GPU_CHECK_PLAN:-full}
START=$(date +%s)
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no GPU: bench/gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False here); nothing was run"
  exit 0
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version | tail -2; } \
  >"$OUT/environment.txt" 2>&1
left() { echo $((TOTAL_S - ($(date +%s) - START))); }
status=0

if [ "$PLAN" != step ]; then
  echo "== 1. SAR kernel"
  timeout 200 "$PY" bench/kernels.py --out "$OUT/kernels.jsonl" $([ "$PLAN" = tune ] && [ -z "${GPU_CHECK_CASES:-}" ] && echo --tune) \
    >"$OUT/kernels.log" 2>&1 || status=1
  tail -n 12 "$OUT/kernels.log"
fi

if [ "$PLAN" = full ]; then
  echo "== 2. attention backends"
  timeout 100 "$PY" bench/attention.py --out "$OUT/attention.jsonl" >"$OUT/attention.log" 2>&1 || status=1
  grep -v '^{' "$OUT/attention.log" | grep -v Warning | tail -n 5

  echo "== 3. training step ($(left) s left)"
  "$PY" bench/train_step.py --gpu --steps 6 --budget-s "$(( $(left) - 15 ))" --out "$OUT/train_step.jsonl" \
    --profile-out "$OUT/profile_plain_224.txt" >"$OUT/train_step.log" 2>&1 || status=1
else
  # name | train_step.py arguments; each case is its own child, profiled. GPU_CHECK_CASES picks some by name.
  cases=(
    "plain|--batches 224:128 --groups plain/224/eager"
    "plain_bf16_weights|--batches 224:128 --groups plain/224/eager --override train.precision=bf16_weights"
    "plain_bf16_weights_search|--groups plain/224/eager --override train.precision=bf16_weights"
    "zero3|--batches 224:128 --groups deepspeed/224/eager --override train.zero3_gather=block"
    "zero3_flat|--batches 224:128 --groups deepspeed/224/eager --override train.zero3_gather=flat"
    "zero3_module|--batches 224:128 --groups deepspeed/224/eager --override train.zero3_gather=module"
    "zero3_deepcompile|--batches 224:128 --groups deepspeed/224/eager --override deepspeed.compile.deepcompile=true --override train.zero3_gather=module"
    "zero3_persistent|--batches 224:128 --groups deepspeed/224/eager --override deepspeed.zero_optimization.stage3_param_persistence_threshold=1e7"
    "zero3_persistent_torch_linear|--batches 224:128 --groups deepspeed/224/eager --override deepspeed.zero_optimization.stage3_param_persistence_threshold=1e7 --override deepspeed.zero_optimization.memory_efficient_linear=false"
    "zero2|--batches 224:128 --groups deepspeed/224/eager --override train.zero_stage=2"
    "zero2_search|--groups deepspeed/224/eager --override train.zero_stage=2"
    "plain_bf16_weights_compile|--batches 224:128 --groups plain/224/compile --override train.precision=bf16_weights"
    "zero2_compile|--batches 224:128 --groups deepspeed/224/compile --override train.zero_stage=2"
  )
  if [ "$PLAN" = step ]; then
    default_cases="plain_bf16_weights zero3 zero3_flat zero3_module zero2 zero3_deepcompile plain_bf16_weights_search zero2_search plain_bf16_weights_compile"
  else
    default_cases="plain plain_bf16_weights zero3 zero3_persistent zero3_persistent_torch_linear"
  fi
  wanted=${GPU_CHECK_CASES:-$default_cases}
  for case in "${cases[@]}"; do
    name=${case%%|*}
    [[ " $wanted " == *" $name "* ]] || continue
    echo "== 3. training step: $name ($(left) s left)"
    [ "$(left)" -lt 60 ] && { echo "   skipped: under 60 s left"; continue; }
    "$PY" bench/train_step.py --gpu --steps 6 --ac off --budget-s "$(( $(left) - 10 ))" \
      --out "$OUT/train_step.jsonl" --profile-out "$OUT/profile_$name.txt" ${case#*|} \
      >"$OUT/train_step_$name.log" 2>&1 || status=1
  done
fi

echo "== summary ($(( $(date +%s) - START )) s)"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines()] if (out / name).is_file() else []
k = rows("kernels.jsonl")
summary = next((r["summary"] for r in k if "summary" in r), None)
print("kernel:", json.dumps(summary) if summary else "no summary (see kernels.log)")
for r in k:
    if "tune" in r:
        print(f"  tune {r['tune']:>6} {r['out']:<9} unroll {r['unroll']} grid {r['grid']:<6} {r['kernel_ms']:>8.4f} ms "
              f"= {r['bw_vs_copy']:.3f} x copy{'' if r['same_output'] else '  OUTPUT DIFFERS'}")
    if "timing" in r:
        print(f"  {r['timing']:>6} {r['out']:<9} kernel {r['kernel_GBps']:>7} GB/s = {r['bw_vs_copy']:.2f} x copy, "
              f"{r['speedup_vs_eager']:>5} x eager")
print("attention (fwd+bwd ms / TFLOP/s / max rel err):")
for r in rows("attention.jsonl"):
    if r.get("shape") and r.get("supported"):
        print(f"  {r['shape']:<27}{r['backend']:<15}{r['ms']:>9.3f}{r['tflops']:>8.1f}{r['max_rel_err']:>10.4f}"
              f"{'' if r['agrees'] else '  DISAGREES'}")
    elif r.get("shape"):
        print(f"  {r['shape']:<27}{r['backend']:<15} unsupported: {r['reason'][:60]}")
sys.path.insert(0, "bench")
from train_step import print_table
print_table(rows("train_step.jsonl"))
for r in rows("train_step.jsonl"):
    if "profile" in r:
        print(f"  profile {r['engine']}{' ' + ' '.join(r['overrides']) if r.get('overrides') else ''}: GPU busy "
              f"{r['gpu_busy_share']:.0%} of {r['wall_s']} s wall ({r['cuda_kernels_s']} s of kernels, 2 steps)")
EOF
exit $status
