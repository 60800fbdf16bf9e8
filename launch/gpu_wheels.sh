#!/usr/bin/env bash
# Downloads, here, the wheels that launch/gpu_benchmark.sh installs on a GPU machine that has no
# network: the packages ddpm_jax's benchmark needs beyond that machine's image (Python 3.12 with
# jax, flax, optax, orbax-checkpoint, torch, huggingface-hub, safetensors, Pillow, PyYAML).
#
# Usage: launch/gpu_wheels.sh [--dry-run] [DIR]      (DIR defaults to .whl, which git ignores)
#
# Each wheel is pinned, for Python 3.12 on x86-64 Linux, without dependencies (the list is
# complete: ml_collections needs absl-py and PyYAML, diffusers importlib_metadata and packages
# the image has). Resume: run it again; pip skips wheels already in DIR.
set -euo pipefail

# shellcheck source=launch/lib.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib.bash"
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
DIR=${1:-.whl}
WHEELS=(ml_collections==1.1.0 diffusers==0.42.1 importlib_metadata==8.7.0)
cmd=(python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 -d "$DIR" "${WHEELS[@]}")
if [[ $DRY_RUN == 1 ]]; then shjoin "${cmd[@]}"; echo; exit 0; fi
"${cmd[@]}"
ls "$DIR"
