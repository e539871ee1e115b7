#!/usr/bin/env bash
# N processes on this machine, each with DEVICES_PER_PROCESS fake CPU devices
# and gloo collectives: how the multi-host path (SLURM, TPU pods) is tested
# on one CPU box.
#
#   launch/local_multiprocess.sh 2 4 --config configs/tiny.py --workdir runs/mp
#
# Process 0 prints progress; the others log to files under
# ${LOG_DIR:-/tmp}/bfpo_mp_<port>_<i>.log. Exits non-zero if any process fails.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 N DEVICES_PER_PROCESS TRAIN_ARGS..." >&2
  exit 2
fi
n=$1; devices=$2; shift 2
python=${PYTHON:-python}
port=${PORT:-$(( 20000 + RANDOM % 20000 ))}
log_dir=${LOG_DIR:-/tmp}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < n; i++)); do
  out=/dev/stdout; err=/dev/stderr
  if [ "$i" -gt 0 ]; then out="$log_dir/bfpo_mp_${port}_$i.log"; err=$out; fi
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$python" -m bfpo_jax.train "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$n" --process_id="$i" >"$out" 2>"$err" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
trap - EXIT
exit "$status"
