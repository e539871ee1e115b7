#!/usr/bin/env bash
# The GPU check of issue 28: every figure in one call, within 8 minutes.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run OUT_DIR  # here: CPU, tiny shapes
#
# First installs the wheels the GPU machine lacks from .whl/ (made by
# benchmarks/gpu_wheels.sh; the device call carries it: carry=[".whl"]) with
# pip --no-index --no-deps --target, onto PYTHONPATH; --dry-run instead checks
# that pip accepts them for CPython 3.12 on manylinux x86_64 and keeps this
# Python's packages. Then benchmarks/gpu_suite.py runs the parts, each in its
# own process and time limit, never stopping at a failure, and writes
# OUT_DIR/gpu_suite.json and OUT_DIR/gpu_suite.log (nothing else: the device
# tool brings back at most 8 files). Exit code 0 when the JSON was written,
# whatever the parts did; 2 on bad arguments.
#
# Environment: PYTHON (default python3), GPU_WHEELS (default .whl),
# GPU_SUITE_BUDGET_S, GPU_SUITE_MAX_LAYERS, GPU_SUITE_PARTS (comma list, for a
# rerun of some parts), BFPO_SMOLLM2_DIR (a converted SmolLM2-135M-Instruct
# folder; without it that check is recorded as skipped).
set -uo pipefail

usage() { echo "usage: benchmarks/gpu_suite.sh [--dry-run] OUT_DIR" >&2; exit 2; }
DRY=""
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=--dry-run ;;
    -*) usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || usage

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-$ROOT/.whl}
mkdir -p "$OUT" || { echo "error: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
: > "$OUT/gpu_suite.log"

# The wheels: into $WORK/site (the device's own packages stay untouched).
install_status="skipped: no wheels in $WHEELS (benchmarks/gpu_wheels.sh)"
wheels=0
started=$(date +%s.%N)
shopt -s nullglob
files=("$WHEELS"/*.whl)
if [ ${#files[@]} -gt 0 ]; then
  wheels=${#files[@]}
  pip_args=(install -q --no-index --no-deps --no-compile --no-cache-dir
            --target "$WORK/site")
  if [ -n "$DRY" ]; then  # as for the device's interpreter, not this one
    pip_args+=(--python-version 3.12 --implementation cp --only-binary=:all:
               --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
               --platform manylinux1_x86_64)
  fi
  if "$PYTHON" -m pip "${pip_args[@]}" "${files[@]}" > "$WORK/install.log" 2>&1; then
    install_status=ok
    [ -n "$DRY" ] || export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    install_status=error
  fi
  cat "$WORK/install.log" >> "$OUT/gpu_suite.log"
fi
install_s=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
echo "install: $install_status ($wheels wheels, ${install_s} s)" | tee -a "$OUT/gpu_suite.log"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "$DRY" ]; then
  # The 7B-shaped runs may fill the card (the plan sizes them to its
  # bytes_limit); parts that share it with torch turn preallocation off.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
fi

args=(--out "$OUT" --work "$WORK" --install_status "$install_status"
      --install_s "$install_s" --install_wheels "$wheels"
      --install_target "$WORK/site" --install_log "$WORK/install.log")
[ -z "$DRY" ] || args+=(--dry-run)
[ -z "${GPU_SUITE_BUDGET_S:-}" ] || args+=(--budget_s "$GPU_SUITE_BUDGET_S")
[ -z "${GPU_SUITE_MAX_LAYERS:-}" ] || args+=(--max_layers "$GPU_SUITE_MAX_LAYERS")
[ -z "${GPU_SUITE_PARTS:-}" ] || args+=(--parts "$GPU_SUITE_PARTS")
"$PYTHON" "$ROOT/benchmarks/gpu_suite.py" "${args[@]}"
rc=$?
if [ -s "$OUT/gpu_suite.json" ]; then
  echo "wrote $OUT/gpu_suite.json and gpu_suite.log"
  exit 0
fi
echo "error: no $OUT/gpu_suite.json (gpu_suite.py exit code $rc)" >&2
exit 1
