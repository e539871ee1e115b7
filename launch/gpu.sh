#!/usr/bin/env bash
# One host, all local GPUs (e.g. 4 x A100): one process drives every GPU.
#
#   launch/gpu.sh --config configs/a100x4.py --workdir runs/bfpo_7b \
#       --config.init_from=/path/to/zephyr-7b-sft-full
#
# Needs: pip install -U "jax[cuda12]" plus requirements.txt.
set -euo pipefail
# Let XLA overlap collectives (FSDP all-gathers / reduce-scatters) with compute.
xla="--xla_gpu_enable_latency_hiding_scheduler=true"
# Combine small collectives into fewer, larger ones.
xla+=" --xla_gpu_all_reduce_combine_threshold_bytes=134217728"
xla+=" --xla_gpu_all_gather_combine_threshold_bytes=134217728"
xla+=" --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
export XLA_FLAGS="${XLA_FLAGS:-} $xla"
# Take 95% of each GPU up front (JAX's default is 75%), no fragmentation later.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec "${PYTHON:-python}" -m bfpo_jax.train "$@"
