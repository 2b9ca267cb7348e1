#!/bin/bash
# Where llama-1b's bf16 step spends its time on a GPU, and which variants pay, in one
# call: profile_step.py traces of full and LoRA (command buffers off, so that every
# kernel is attributed to its HLO op; the optimized HLO beside), then paired_ab.py
# variants in one process per mode (defaults: the open questions, FULL_VARIANTS and
# LORA_VARIANTS override them).
# Results go to $OUT (default /tmp/ftlib-gpu). Run from the repo root:
#   bash benchmarks/gpu_profile.sh
# Setup (wheels, $OUT, versions): gpu_env.sh.
source "$(dirname "$0")/gpu_env.sh"
# Several 1B states (13 GB each) live in one paired_ab process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

for mode in full lora; do
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout "${PROFILE_S:-90}" \
    python3 benchmarks/profile_step.py --workload=llama-1b --dtype=bfloat16 --mode=$mode \
    --top="${TOP:-60}" --out="$OUT/profile_1b_$mode.json" --hlo_out="$OUT/hlo_1b_$mode.txt.gz"
done

timeout "${PAIRED_S:-150}" python3 benchmarks/paired_ab.py --workload=llama-1b \
  --dtype=bfloat16 --mode=full --variants="${FULL_VARIANTS:-indexed_layers}" \
  --out="$OUT/paired_1b_full.json"
timeout "${PAIRED_S:-150}" python3 benchmarks/paired_ab.py --workload=llama-1b \
  --dtype=bfloat16 --mode=lora --variants="${LORA_VARIANTS:-lora_two_products,indexed_layers}" \
  --out="$OUT/paired_1b_lora.json"
