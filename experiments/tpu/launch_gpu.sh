#!/usr/bin/env bash
# ftlib on GPUs. One host: a single process drives all its GPUs (mesh data=-1
# spreads the batch over them). Several hosts: one process per host joined
# through process 0's address, or `srun ... --multihost` under Slurm.
#
#   bash experiments/tpu/launch_gpu.sh one-host configs/default.py runs/rt_lora [overrides]
#   # on host i of N (same command everywhere except PROCESS_ID):
#   COORDINATOR=host0:8476 NUM_PROCESSES=2 PROCESS_ID=0 \
#     bash experiments/tpu/launch_gpu.sh multi-host configs/default.py /shared/runs/rt_lora
set -euo pipefail

ACTION=${1:?usage: launch_gpu.sh one-host|multi-host|slurm CONFIG WORKDIR [overrides]}
CONFIG=${2:?config file}
WORKDIR=${3:?workdir (shared storage for multi-host)}
shift 3
# XLA's latency-hiding scheduler overlaps the FSDP all-gathers with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

case "$ACTION" in
  one-host)
    python train.py --config="$CONFIG" --workdir="$WORKDIR" \
      --config.model.dtype=bfloat16 --config.mesh.data=-1 "$@"
    ;;
  multi-host)
    python train.py --config="$CONFIG" --workdir="$WORKDIR" \
      --coordinator_address="${COORDINATOR:?host0:port}" \
      --num_processes="${NUM_PROCESSES:?}" --process_id="${PROCESS_ID:?}" \
      --config.model.dtype=bfloat16 "$@"
    ;;
  slurm)
    srun python train.py --multihost --config="$CONFIG" --workdir="$WORKDIR" \
      --config.model.dtype=bfloat16 "$@"
    ;;
  *)
    echo "unknown action $ACTION" >&2
    exit 2
    ;;
esac
