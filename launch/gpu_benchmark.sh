#!/usr/bin/env bash
# The one-shot GPU measurement, for a lent accelerator with no network (one command, under
# 8 minutes on an H100/H200): installs the wheels of launch/gpu_wheels.sh, then runs
# `python -m ddpm_jax.bench.gpu`, which measures the CIFAR-10 train step at batch 128 in bf16
# and f32 (steps/s, MFU against 989 TFLOP/s, peak memory, compile times, and PyTorch +
# diffusers on the same GPU), the 256x256 model's step at batch 64, a 1000-step ancestral chain
# and a 20-step DPM-Solver++ chain for 256 images, into one JSON file.
#
# Usage (from the repository root):
#   launch/gpu_wheels.sh                        # here, once: the wheels into .whl/
#   launch/gpu_benchmark.sh [--dry-run] [OUT_DIR] [-- extra flags of ddpm_jax.bench.gpu]
# With the device tool: run `launch/gpu_benchmark.sh "$OUT"` carrying .whl; the record is
# $OUT/gpu_benchmark.json and the log $OUT/gpu_benchmark.log.
#
# Environment: PYTHON (default python3), WHEELS (default .whl), SITE (default /tmp/ddpm_site),
# TIMEOUT seconds for the measurement (default 470). The record is rewritten after each
# measurement, so a timeout keeps what was measured. Resume: run it again (nothing is kept
# between runs; each run measures everything it is asked for).
set -euo pipefail

# shellcheck source=launch/lib.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib.bash"
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/ddpm_site}
TIMEOUT=${TIMEOUT:-470}
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
OUT_DIR=${1:-.}
[[ ${1:-} ]] && shift
[[ ${1:-} == -- ]] && shift
install=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
  --target "$SITE")
bench=(timeout "$TIMEOUT" "$PYTHON" -m ddpm_jax.bench.gpu "--json=$OUT_DIR/gpu_benchmark.json" "$@")
if [[ $DRY_RUN == 1 ]]; then
  echo "$(shjoin "${install[@]}") $WHEELS/*.whl"
  echo "PYTHONPATH=$SITE:. PYTHONUNBUFFERED=1 $(shjoin "${bench[@]}") 2>&1 | tee $(shq "$OUT_DIR/gpu_benchmark.log")"
  exit 0
fi
compgen -G "$WHEELS/*.whl" >/dev/null || { echo "gpu_benchmark.sh: no wheels in $WHEELS: run launch/gpu_wheels.sh here first" >&2; exit 2; }
"${install[@]}" "$WHEELS"/*.whl
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >"$OUT_DIR/nvidia_smi.csv" 2>&1 || true
set -o pipefail
PYTHONPATH="$SITE:." PYTHONUNBUFFERED=1 "${bench[@]}" 2>&1 | tee "$OUT_DIR/gpu_benchmark.log"
