#!/bin/bash
# The performance issue's GPU checks in one call (a lent GPU machine has minutes):
# the attention kernels, then llama-1b in bf16 (ftlib with the fastest right kernel,
# and HF PEFT), then the CPU workloads in fp32, each stage under its own timeout.
# Results go to $OUT (default /tmp/ftlib-gpu). Run from the repo root:
#   bash benchmarks/gpu_run.sh
# Setup (wheels, $OUT, versions): gpu_env.sh.
source "$(dirname "$0")/gpu_env.sh"

best=$(timeout "${ATTN_S:-120}" python3 benchmarks/attention_kernels.py \
  --out="$OUT/attention_kernels.json" 2>&1 | tee "$OUT/attention.log" | tail -1)
case "$best" in blocked | cudnn | pallas) ;; *) best=blocked ;; esac
echo "attention for llama-1b: $best"

timeout "${BIG_S:-300}" python3 benchmarks/step_time.py --workloads=llama-1b --dtype=bfloat16 \
  --attention="$best" --vs=hf --out="$OUT/step_time_gpu_1b.json" 2>&1 | tee "$OUT/step_1b.log"

timeout "${FP32_S:-150}" python3 benchmarks/step_time.py --workloads=llama-tiny,llama-small \
  --vs=hf --out="$OUT/step_time_gpu_fp32.json" 2>&1 | tee "$OUT/step_fp32.log"
