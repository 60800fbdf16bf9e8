#!/usr/bin/env bash
# Multi-node GPU run without a scheduler: one process per node, each owning all of its GPUs,
# joined through the explicit contract JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID that ddpm_jax.runtime.distributed reads.
#
# Usage, mode 1: on every node, the same command with that node's rank (0 on the coordinator):
#   JAX_COORDINATOR_ADDRESS=node0:12345 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=<rank> \
#     launch/multinode_gpu.sh -- --config=configs/cifar10.py --workdir=/shared/ddpm/cifar10
# Usage, mode 2: from one machine, start every node over ssh (node i gets rank i, the first
# host is the coordinator) and wait for all; logs in LOGDIR/node_<i>.log:
#   launch/multinode_gpu.sh --hosts node0,node1,node2,node3 [--port 12345] [--remote-dir DIR] \
#     [--env NAME=VALUE ...] -- --config=configs/cifar10.py --workdir=/shared/ddpm/cifar10
# Both modes: --dry-run (or DRY_RUN=1) prints the commands and runs nothing.
#
# Needs: ddpm_jax and jax[cuda] installed on every node under the same $PYTHON (default:
# python); the repository at the same path on every node (--remote-dir, default: this
# directory); a workdir every node sees (NFS, Lustre, gs://...); in mode 2, password-less ssh.
# Words after `--` that start with an option are arguments of `$PYTHON -m ddpm_jax.main`;
# otherwise they are the command itself.
# A node whose peer dies stops on JAX's coordination heartbeat (about 100 s).
# Resume: run the same command again with the same --workdir.
set -euo pipefail

# shq, shjoin, absolute_workdir_args.
# shellcheck source=launch/lib.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib.bash"
die() { echo "multinode_gpu.sh: $*" >&2; exit 2; }

DRY_RUN=${DRY_RUN:-0}
HOSTS=${HOSTS:-}
PORT=${PORT:-12345}
REMOTE_DIR=${REMOTE_DIR:-$PWD}
LOGDIR=${LOGDIR:-${TMPDIR:-/tmp}/ddpm_jax_multinode_$(date +%Y%m%d_%H%M%S)_$$}
PYTHON=${PYTHON:-python}
extra_env=()
while (($#)); do
  case $1 in
    --hosts) HOSTS=${2:?--hosts needs a value}; shift 2 ;;
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --remote-dir) REMOTE_DIR=${2:?--remote-dir needs a value}; shift 2 ;;
    --logdir) LOGDIR=${2:?--logdir needs a value}; shift 2 ;;
    --env) [[ ${2:-} == [A-Za-z_]*=* ]] || die "--env needs NAME=VALUE"; extra_env+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command goes after '--'; see --help)" ;;
  esac
done
(($#)) || die "no command: give one after '--', e.g. -- --config=configs/X.py --workdir=DIR"
# Every node runs in REMOTE_DIR (this directory unless --remote-dir says otherwise).
absolute_workdir_args "$REMOTE_DIR" "$@"
set -- "${ARGS[@]}"
if [[ $1 == -* ]]; then
  command=("$PYTHON" -m ddpm_jax.main "$@")
else
  command=("$@")
fi

if [[ -z $HOSTS ]]; then
  # Mode 1: this node only.
  : "${JAX_COORDINATOR_ADDRESS:?set JAX_COORDINATOR_ADDRESS=host:port of the rank-0 node (same on every node)}"
  : "${JAX_NUM_PROCESSES:?set JAX_NUM_PROCESSES to the number of nodes}"
  : "${JAX_PROCESS_ID:?set JAX_PROCESS_ID to the rank of this node, 0..JAX_NUM_PROCESSES-1}"
  [[ $JAX_NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "JAX_NUM_PROCESSES='$JAX_NUM_PROCESSES' is not a positive integer"
  if ! [[ $JAX_PROCESS_ID =~ ^[0-9]+$ ]] || ((JAX_PROCESS_ID >= JAX_NUM_PROCESSES)); then
    die "JAX_PROCESS_ID='$JAX_PROCESS_ID' must be in 0..$((JAX_NUM_PROCESSES - 1))"
  fi
  line=$(shjoin env "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS" \
    "JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES" "JAX_PROCESS_ID=$JAX_PROCESS_ID" \
    ${extra_env[@]+"${extra_env[@]}"} "${command[@]}")
  if [[ $DRY_RUN == 1 ]]; then echo "$line"; exit 0; fi
  exec env "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS" \
    "JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES" "JAX_PROCESS_ID=$JAX_PROCESS_ID" \
    ${extra_env[@]+"${extra_env[@]}"} "${command[@]}"
fi

# Mode 2: fan out over ssh.
IFS=, read -r -a hosts <<<"$HOSTS"
num=${#hosts[@]}
((num > 0)) || die "--hosts is empty"
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
  die "--port must be in 1..65535, got '$PORT'"
fi
coordinator="${hosts[0]}:$PORT"
lines=()
for ((i = 0; i < num; i++)); do
  remote="cd $(shq "$REMOTE_DIR") && $(shjoin env "JAX_COORDINATOR_ADDRESS=$coordinator" \
    "JAX_NUM_PROCESSES=$num" "JAX_PROCESS_ID=$i" ${extra_env[@]+"${extra_env[@]}"} "${command[@]}")"
  lines+=("$(shjoin ssh -o BatchMode=yes "${hosts[$i]}" "$remote")")
done
if [[ $DRY_RUN == 1 ]]; then
  echo "mkdir -p $(shq "$LOGDIR")"
  for ((i = 0; i < num; i++)); do echo "${lines[$i]} > $(shq "$LOGDIR/node_$i.log") 2>&1 &"; done
  echo "wait  # for all $num nodes; exit with the first non-zero status"
  exit 0
fi
mkdir -p "$LOGDIR"
echo "multinode_gpu.sh: $num nodes, coordinator $coordinator, logs in $LOGDIR" >&2
pids=()
for ((i = 0; i < num; i++)); do
  bash -c "exec ${lines[$i]}" >"$LOGDIR/node_$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for ((i = 0; i < num; i++)); do
  node_rc=0
  wait "${pids[$i]}" || node_rc=$?
  if ((node_rc != 0)); then
    echo "multinode_gpu.sh: node $i (${hosts[$i]}) exited with status $node_rc; see $LOGDIR/node_$i.log" >&2
    ((rc != 0)) || rc=$node_rc
  fi
done
exit "$rc"
