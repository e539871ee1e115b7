#!/usr/bin/env bash
# The same command on every worker of a TPU pod slice.
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b --config configs/tpu_v4_32.py \
#       --workdir gs://my-bucket/runs/bfpo_7b
#
# Needs: the repo checked out at ~/bfpo-jax on every worker with
# `pip install "jax[tpu]" -r requirements.txt`, and a workdir on a bucket all
# workers share (orbax writes gs:// paths directly). jax.distributed finds
# the coordinator and worker index from the TPU metadata itself.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE TRAIN_ARGS..." >&2
  exit 2
fi
name=$1; zone=$2; shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/bfpo-jax && python -m bfpo_jax.train $args"
