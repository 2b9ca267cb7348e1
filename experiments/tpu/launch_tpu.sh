#!/usr/bin/env bash
# ftlib on a Cloud TPU VM slice: every worker runs the same train.py (one JAX
# process per host, joined with --multihost); checkpoints and metrics go to GCS,
# so a preempted slice resumes by running the same command again.
#
#   export TPU_NAME=ftlib-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-16 BUCKET=gs://my-bucket
#   bash experiments/tpu/launch_tpu.sh create            # queued resource (spot by default)
#   bash experiments/tpu/launch_tpu.sh install           # clone + pip install on all workers
#   bash experiments/tpu/launch_tpu.sh run configs/default.py rt_lora --config.max_steps=500
#   bash experiments/tpu/launch_tpu.sh status | delete
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5litepod-16}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}   # the TPU VM image for the accelerator generation
REPO=${REPO:-https://github.com/ftlib/ftlib.git}
SPOT=${SPOT:---spot}                      # SPOT= (empty) for an on-demand slice

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:?usage: launch_tpu.sh create|install|run CONFIG RUN [overrides]|status|delete}" in
  create)
    gcloud compute tpus queued-resources create "$TPU_NAME-qr" --node-id="$TPU_NAME" \
      --zone="$ZONE" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" $SPOT
    ;;
  install)
    # jax[tpu] pinned to the jax series ftlib is tested with; gcsfs lets orbax and
    # the metrics writer use gs:// workdirs.
    on_all_workers "rm -rf ftlib && git clone --depth 1 $REPO ftlib && cd ftlib && \
      pip install -e . 'jax[tpu]>=0.10,<0.11' gcsfs"
    ;;
  run)
    : "${BUCKET:?set BUCKET=gs://...}"
    CONFIG=${2:?config file}
    RUN=${3:?run name}
    shift 3
    # Same command on every worker; rerunning it after preemption resumes from
    # $BUCKET/ftlib/$RUN/checkpoints/latest (data position included).
    on_all_workers "cd ftlib && python train.py --multihost --config=$CONFIG \
      --workdir=$BUCKET/ftlib/$RUN --config.model.dtype=bfloat16 $*"
    ;;
  status)
    gcloud compute tpus queued-resources describe "$TPU_NAME-qr" --zone="$ZONE"
    ;;
  delete)
    gcloud compute tpus queued-resources delete "$TPU_NAME-qr" --zone="$ZONE" --force --async
    ;;
  *)
    echo "unknown action $1" >&2
    exit 2
    ;;
esac
