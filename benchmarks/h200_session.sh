#!/usr/bin/env bash
# One GPU session on one H200, most valuable first, everything logged and written under OUTDIR:
#   f) benchmarks/engine_step_gpu.py: the engine's graphed decode step alone (first: 30 s)
#   a) pytest -m gpu: the CUDA-graph decode tests and the Triton kernel tests at full sizes
#   b) benchmarks/decode_gpu.py: Engine (CUDA graphs on/off) vs transformers generate, Mixtral-shaped
#   c) benchmarks/moe_layer.py --train: the MoE layer grid (+ fwd/bwd vs sorted), shorter repeats
#   d) benchmarks/moe_layer.py --train-model: whole-model training step, triton vs sorted
#   e) decode_gpu.py on the full 32-layer Mixtral shape at batch 1, if the budget has time left
# Each part runs under `timeout` inside a total budget (BUDGET_S, default 530 s); a failing part does
# not stop the next. Autotuned launch configs of new shapes land in OUTDIR/cache/triton/.
# Usage (repo root or anywhere): CUDA_VISIBLE_DEVICES=0 bash benchmarks/h200_session.sh OUTDIR
set -u
OUT=${1:?usage: $0 OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MOESAIC_CACHE_DIR="$OUT/cache"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-530}
START=$(date +%s)

part() {  # part NAME LIMIT_S CMD...: run CMD under timeout (capped by what is left), log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then echo "== $name skipped: ${left}s of the budget left"; return; fi
  echo "== $name: limit ${limit}s, start $(date -u +%T)"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc ($( ((rc == 124 || rc == 137)) && echo 'TIMED OUT' || echo done)) in $(( $(date +%s) - t0 ))s"
  grep -iE "passed|failed|error|skipped|^\| |^# (B=|model step|geomean|min_speed|train|transformers|NVIDIA|wrote)|tok/s" \
    "$OUT/$name.log" | tail -n 30
  (( rc != 0 )) && tail -n 12 "$OUT/$name.log"
  return 0
}

{
  echo "== session $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
  nvidia-smi -L 2>&1 | head -4
  $PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/env.log"

# the engine's decode step alone (~30 s): decode_gpu.py's steps should come out close to this on a quiet machine
part f_engine_step 60 $PY benchmarks/engine_step_gpu.py
part a_pytest_gpu 110 $PY -m pytest -o addopts= -m gpu -v --tb=short -p no:cacheprovider tests/test_graphs.py tests/test_triton.py
part b_decode_gpu 240 $PY benchmarks/decode_gpu.py --device cuda --layers 8 --batches 1 8 --out "$OUT/decode_gpu_h200.json"
part c_moe_layer 170 $PY benchmarks/moe_layer.py --device cuda --train --rep-ms 30 --json "$OUT/moe_layer_h200.json"
part d_train_model 90 $PY benchmarks/moe_layer.py --train-model --rep-ms 50 --json "$OUT/train_model_h200.json"
# e) if time is left: the full 32-layer Mixtral-8x7B shape (93 GB of bf16 weights, shared by both systems)
part e_decode_gpu_32 120 $PY benchmarks/decode_gpu.py --device cuda --layers 32 --batches 1 \
  --hf-impls grouped_mm batched_mm --compile-batches --out "$OUT/decode_gpu_h200_32layers.json"
echo "== session done in $(( $(date +%s) - START ))s; files:"
ls -la "$OUT"
{  # the headline lines of every part, last, so they survive a truncated output
  echo "== summary"
  grep -hE "^=+ .*(passed|failed|error|skipped)" "$OUT/a_pytest_gpu.log" 2>/dev/null | tail -n 2
  grep -hE "FAILED|ERROR " "$OUT/a_pytest_gpu.log" 2>/dev/null | head -n 10
  grep -hE "decode step median" "$OUT/f_engine_step.log" 2>/dev/null
  for f in "$OUT"/b_decode_gpu.log "$OUT"/e_decode_gpu_32.log; do
    [ -f "$f" ] && { echo "-- $(basename "$f")"; grep -hE "^# (B=|NVIDIA|transformers)|^# .*TB/s" "$f"; }
  done
  grep -hE "^# (geomean|min_speed|train fwd)" "$OUT/c_moe_layer.log" 2>/dev/null
  grep -hE "^# model step" "$OUT/d_train_model.log" 2>/dev/null
} | tee "$OUT/summary.txt"
