#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it (or reuse it), install this repository on every worker,
# and run the same `python -m ddpm_jax.main` on all workers at once (one process per host).
# The run sets DDPM_JAX_DISTRIBUTED=auto, so ddpm_jax.runtime.distributed calls
# jax.distributed.initialize() and JAX finds the other hosts through the TPU metadata server.
#
# Usage (from the repository root, with gcloud authenticated and a project set):
#   TPU_NAME=ddpm-v4-32 ZONE=us-central2-b launch/tpu_vm_pod.sh [--dry-run] -- \
#       --config=configs/cifar10.py --workdir=gs://BUCKET/ddpm/cifar10 [--config.g.f=v ...]
# Environment:
#   TPU_NAME, ZONE        required
#   PROJECT               gcloud project (default: gcloud's configured one)
#   ACCELERATOR_TYPE      slice type, default v4-32 (16 chips, 4 hosts); v4-128 is 64 chips
#   RUNTIME_VERSION       TPU VM image; default from the type: v4 tpu-ubuntu2204-base,
#                         v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   SPOT=1                create spot (preemptible) VMs
#   JAX_SPEC              pip requirement for JAX on TPU (default: jax[tpu])
#   WORKER_PYTHON         interpreter on the workers (default: python3)
#   SKIP_INSTALL=1        reuse the installed copy (no upload, no pip)
#   DRY_RUN=1 or --dry-run  print the commands, run nothing
# Needs: gcloud, git, tar. The workdir must be a gs:// bucket: every host reads and writes
# the same checkpoints, and a worker's local disk disappears with a preempted slice.
#
# Resume: run the same command again. A slice that was preempted and deleted is created
# anew, the code reinstalled, and training restarts from the last checkpoint in the workdir.
# The run stays attached to this terminal; use tmux/screen for long runs (a dropped ssh
# session stops it, and re-running the command resumes it).
set -euo pipefail

# shq, shjoin.
# shellcheck source=launch/lib.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib.bash"
die() { echo "tpu_vm_pod.sh: $*" >&2; exit 2; }
# Prints a shell command line (DRY_RUN=1) or runs it with bash: what is printed is what runs.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$1"
  else
    echo "+ $1" >&2
    bash -o pipefail -c "$1"
  fi
}

DRY_RUN=${DRY_RUN:-0}
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
(($#)) || die "no arguments: give -- --config=configs/X.py --workdir=gs://BUCKET/DIR"
: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM slice}"
: "${ZONE:?set ZONE, e.g. us-central2-b (v4) or us-west4-a (v5e)}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
if [[ -z ${RUNTIME_VERSION:-} ]]; then
  case $ACCELERATOR_TYPE in
    v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION" ;;
  esac
fi
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
WORKER_PYTHON=${WORKER_PYTHON:-python3}
SPOT=${SPOT:-0}
SKIP_INSTALL=${SKIP_INSTALL:-0}

workdir=""
has_config=0
for arg in "$@"; do
  case $arg in
    --workdir=*) workdir=${arg#--workdir=} ;;
    --config=* | --config) has_config=1 ;;
  esac
done
((has_config)) || die "missing --config=configs/X.py"
[[ $workdir == gs://?* ]] ||
  die "--workdir must be a gs:// path (got '${workdir:-nothing}'): all hosts share the checkpoints there"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tarball=${TMPDIR:-/tmp}/ddpm_jax_src_${TPU_NAME}.tar.gz
remote_dir=ddpm_jax
gcloud_where=(--zone="$ZONE")
[[ -n ${PROJECT:-} ]] && gcloud_where+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)

# 1. Reuse the slice if it exists, else create it.
create=("${tpu[@]}" create "$TPU_NAME" "${gcloud_where[@]}" --accelerator-type="$ACCELERATOR_TYPE"
  --version="$RUNTIME_VERSION")
[[ $SPOT == 1 ]] && create+=(--spot)
run "$(shjoin "${tpu[@]}" describe "$TPU_NAME" "${gcloud_where[@]}") >/dev/null 2>&1 || $(shjoin "${create[@]}")"

# 2. Ship the working tree (tracked and untracked, minus what git ignores) to every worker
#    and install it there with JAX for TPU.
if [[ $SKIP_INSTALL != 1 ]]; then
  run "git -C $(shq "$repo") ls-files -z --cached --others --exclude-standard | tar -C $(shq "$repo") --null --ignore-failed-read -T - -czf $(shq "$tarball")"
  run "$(shjoin "${tpu[@]}" scp "$tarball" "$TPU_NAME:ddpm_jax_src.tar.gz" "${gcloud_where[@]}" --worker=all)"
  install="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf ddpm_jax_src.tar.gz -C $remote_dir"
  install+=" && $(shjoin "$WORKER_PYTHON" -m pip install -q -U "$JAX_SPEC" "./$remote_dir")"
  run "$(shjoin "${tpu[@]}" ssh "$TPU_NAME" "${gcloud_where[@]}" --worker=all --command "$install")"
fi

# 3. The same command on every worker, at once.
train="cd $remote_dir && $(shjoin env DDPM_JAX_DISTRIBUTED=auto "$WORKER_PYTHON" -m ddpm_jax.main "$@")"
run "$(shjoin "${tpu[@]}" ssh "$TPU_NAME" "${gcloud_where[@]}" --worker=all --command "$train")"
