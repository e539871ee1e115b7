#!/usr/bin/env bash
# Fills .whl/ with the wheels the GPU machine lacks, for its CPython 3.12 on
# manylinux x86_64 (benchmarks/gpu_wheels.txt lists them), and checks them:
# one wheel per listed version (others are removed: two versions stop the
# install there), none of a package the machine already has
# (benchmarks/gpu_device_packages.txt), and wheels plus working tree within
# the 64 MiB the device tool carries. Prints the check as JSON; exit code 1
# when it fails.
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh
#   # then, on the device: run(command="bash benchmarks/gpu_suite.sh $OUT",
#   #                          carry=[".whl"])
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEST=${GPU_WHEELS:-$ROOT/.whl}
mkdir -p "$DEST"
mapfile -t specs < <(grep -v '^#' "$ROOT/benchmarks/gpu_wheels.txt" | awk 'NF {print $1}')
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$DEST" "${specs[@]}"
"$PYTHON" "$ROOT/benchmarks/gpu_checks.py" wheels "$DEST"
